"""``flowforce evaluate``: free-energy surfaces of a CG trajectory against mapped all-atom data;
the work lives in :mod:`openmm_flowforce.analysis.fes`."""
from __future__ import annotations

import argparse

from openmm_flowforce.cli.config import CommandFiles, flag
from openmm_flowforce.errors import FlowforceError
from openmm_flowforce.options import COUNT, NON_NEGATIVE, POSITIVE_INT

HELP = "compare free-energy surfaces (phi/psi or chosen CVs) of a CG trajectory with mapped reference data"

EPILOG = """\
CVs: --cv dihedral:i,j,k,l (degrees, grid [-180, 180)) or --cv distance:i,j (nm, grid over the
range of both ensembles + 5%), one or two of them; bead indices of the CG topology. Default:
phi = dihedral:0,1,2,3 and psi = dihedral:1,2,3,4 of the 5 backbone beads.

Divergences in nats on the shared histogram grid (--bins per CV), with a pseudocount
(--pseudocount, default 0.1) added to every bin of both histograms and no other smoothing:
  KL(reference || model), KL(model || reference) and Jensen-Shannon (0 <= JS <= log 2).

Example:
  flowforce evaluate cg.dcd --topology cg.pdb --reference ala.npz --mapping backbone \\
      --out report.json --plot fes.png
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from openmm_flowforce.coordinates.cg_mapping import MAPPING_PRESETS

    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("trajectory", metavar="TRAJ.dcd", help="CG trajectory (flowforce simulate output)")
    parser.add_argument("--topology", required=True, metavar="CG.pdb", help="CG topology (flowforce cg output)")
    parser.add_argument("--reference", required=True, nargs="+", metavar="DATA.npz",
                        help="all-atom data: a .npz (flowforce md output), or trajectory files mdtraj reads (DCD, "
                             "XTC, TRR, H5, NetCDF) with --reference-topology")
    parser.add_argument("--reference-topology", metavar="TOP",
                        help="topology of reference trajectory files (PDB, prmtop, psf, gro)")
    parser.add_argument("--reference-stride", type=flag(POSITIVE_INT), default=1, metavar="N",
                        help="keep every N-th reference trajectory frame (default 1)")
    parser.add_argument("--reference-select", metavar="SELECTION",
                        help="mdtraj atom selection of the reference trajectory (e.g. 'not water')")
    parser.add_argument("--mapping", default="backbone", choices=list(MAPPING_PRESETS),
                        help="mapping of the reference onto the beads (default: backbone)")
    parser.add_argument("--cv", action="append", metavar="KIND:i,j,..",
                        help="collective variable; give once or twice (default: phi and psi)")
    parser.add_argument("--bins", type=flag(POSITIVE_INT), default=36, metavar="N", help="bins per CV (default 36: 10° for dihedrals)")
    parser.add_argument("--pseudocount", type=flag(NON_NEGATIVE), default=0.1, metavar="A", help="added to every bin (default 0.1)")
    parser.add_argument("--skip", type=flag(COUNT), default=0, metavar="N", help="drop the first N trajectory frames (default 0)")
    parser.add_argument("--out", required=True, metavar="REPORT.json", help="JSON report to write")
    parser.add_argument("--plot", metavar="FES.png", help="also plot reference | model | difference")


def files(args: argparse.Namespace) -> CommandFiles:
    references = {f"--reference[{i}]" if len(args.reference) > 1 else "--reference": path
                  for i, path in enumerate(args.reference)}
    return CommandFiles(inputs={"TRAJ.dcd": args.trajectory, "--topology": args.topology, **references,
                                "--reference-topology": args.reference_topology},
                        outputs={"--out": args.out, "--plot": args.plot})


def run(args: argparse.Namespace) -> int:
    """Exit code 0 on success, 2 on bad input."""
    import json
    from pathlib import Path

    from openmm_flowforce.analysis.fes import (PHI_PSI, compare_fes, load_trajectory_positions,
                                               mapped_reference_positions, plot_fes)
    from openmm_flowforce.io import atomic_write_bytes

    model = load_trajectory_positions(args.trajectory, args.topology, args.skip)
    from openmm_flowforce.data.trajectory import load_data

    reference_data = load_data(args.reference[0] if len(args.reference) == 1 else args.reference,
                               topology=args.reference_topology, stride=args.reference_stride,
                               selection=args.reference_select)
    reference = mapped_reference_positions(reference_data, args.mapping)
    if reference.shape[1] != model.shape[1]:
        raise FlowforceError(f"the trajectory has {model.shape[1]} beads but --mapping {args.mapping} maps the "
                             f"reference to {reference.shape[1]}")
    comparison = compare_fes(reference, model, args.cv or PHI_PSI, bins=args.bins, pseudocount=args.pseudocount)
    reference_name = " ".join(str(p) for p in args.reference)
    report = {**comparison.report(), "trajectory": str(args.trajectory), "reference": reference_name,
              "mapping": args.mapping, "skip": args.skip}
    atomic_write_bytes(args.out, (json.dumps(report, indent=1) + "\n").encode())
    if args.plot:
        plot_fes(comparison, args.plot, titles=(f"reference ({Path(args.reference[0]).name})",
                                                f"model ({Path(args.trajectory).name})"))
    d = comparison.divergences
    print(f"JS {d['js']:.4f} nats, KL(ref||model) {d['kl']:.4f}, KL(model||ref) {d['kl_reverse']:.4f} "
          f"on {' x '.join(str(len(e) - 1) for e in comparison.edges)} bins "
          f"({comparison.frames['reference']} reference / {comparison.frames['model']} model frames)")
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0
