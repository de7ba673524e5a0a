"""``flowforce evaluate``: free-energy surfaces of a CG trajectory against mapped all-atom data
(:mod:`openmm_flowforce.analysis.fes`); with ``--protein``, folding, kinetics and TICA / (Q, RMSD)
surfaces of a protein model on the Cα level (:mod:`openmm_flowforce.analysis.protein_report`)."""
from __future__ import annotations

import argparse

from openmm_flowforce.cli.config import CommandFiles, flag
from openmm_flowforce.errors import FlowforceError
from openmm_flowforce.errors import OptionError
from openmm_flowforce.options import COUNT, FRACTION, NON_NEGATIVE, POSITIVE_INT

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

Proteins (--protein): compare a model of a small protein (e.g. chignolin) with reference MD on
the C-alpha level. TRAJ (the model) is a CG trajectory (DCD, ... with --topology CG.pdb) or
a samples or dataset .npz, all-atom or CG with CA beads (flowforce cg --mapping ca or
backbone); --reference is all-atom (mapped to its CA atoms) or CG with CA beads; --folded is
the folded structure (PDB). For both ensembles:
  Q       fraction of native CA contacts (Best, Hummer, Eaton, PNAS 2013: pairs > 3 residues
          apart within 0.8 nm in --folded, beta = 50/nm, lambda = 1.5);
  RMSD    CA-RMSD to --folded after optimal superposition, nm;
  states  transition-based: folded after entering Q >= --q-folded, unfolded after entering
          Q <= --q-unfolded; folding/unfolding events need a visit to the other core, so
          noise at a threshold never counts; folded fraction +- standard error over
          --blocks time blocks, or over replicas when the data has a replica array;
  TICA    deeptime TICA on inverse CA-CA distances (|i-j| >= 3), fitted on the reference
          with lag --tica-lag frames, applied to both;
  FES     on (TIC1, TIC2) and (Q, RMSD), shared bins, JS and KL in nats as above.
The JSON report holds all of it; --plots DIR writes fes_tica.png, fes_q_rmsd.png and
q_timeseries.png.

  flowforce evaluate --protein cg.dcd --topology cg.pdb --reference cln025.npz \\
      --folded folded.pdb --out report.json --plots plots/
"""

#: Options of --protein only, with their defaults (None: given or not).
PROTEIN_ONLY = {"folded": None, "plots": None, "q_folded": None, "q_unfolded": None, "tica_lag": None, "blocks": None}
#: Options of the phi/psi (CV) mode only.
CV_ONLY = {"cv": None, "plot": None, "mapping": None}
PROTEIN_DEFAULTS = {"q_folded": 0.7, "q_unfolded": 0.3, "tica_lag": 10, "blocks": 10}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from openmm_flowforce.coordinates.cg_mapping import MAPPING_PRESETS

    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("trajectory", metavar="TRAJ.dcd",
                        help="CG trajectory (flowforce simulate output); with --protein also a samples or dataset .npz")
    parser.add_argument("--topology", metavar="CG.pdb", help="CG topology (flowforce cg output); needed for trajectories")
    parser.add_argument("--reference", required=True, nargs="+", metavar="DATA.npz",
                        help="all-atom data: a .npz (flowforce md output), or trajectory files mdtraj reads (DCD, "
                             "XTC, TRR, H5, NetCDF) with --reference-topology")
    parser.add_argument("--reference-topology", metavar="TOP",
                        help="topology of reference trajectory files (PDB, prmtop, psf, gro)")
    parser.add_argument("--reference-stride", type=flag(POSITIVE_INT), default=1, metavar="N",
                        help="keep every N-th reference trajectory frame (default 1)")
    parser.add_argument("--reference-select", metavar="SELECTION",
                        help="mdtraj atom selection of the reference trajectory (e.g. 'not water')")
    parser.add_argument("--mapping", choices=list(MAPPING_PRESETS),
                        help="mapping of the reference onto the beads (default: backbone)")
    parser.add_argument("--cv", action="append", metavar="KIND:i,j,..",
                        help="collective variable; give once or twice (default: phi and psi)")
    parser.add_argument("--bins", type=flag(POSITIVE_INT), default=36, metavar="N", help="bins per CV (default 36: 10° for dihedrals)")
    parser.add_argument("--pseudocount", type=flag(NON_NEGATIVE), default=0.1, metavar="A", help="added to every bin (default 0.1)")
    parser.add_argument("--skip", type=flag(COUNT), default=0, metavar="N", help="drop the first N trajectory frames (default 0)")
    parser.add_argument("--out", required=True, metavar="REPORT.json", help="JSON report to write")
    parser.add_argument("--plot", metavar="FES.png", help="also plot reference | model | difference")
    protein = parser.add_argument_group("proteins (--protein)")
    protein.add_argument("--protein", action="store_true",
                         help="evaluate folding on the C-alpha level: Q, RMSD, states, TICA (see below)")
    protein.add_argument("--folded", metavar="FOLDED.pdb", help="the folded structure, all-atom or CA beads")
    protein.add_argument("--plots", metavar="DIR", help="write fes_tica.png, fes_q_rmsd.png, q_timeseries.png here")
    protein.add_argument("--q-folded", type=flag(FRACTION), metavar="Q",
                         help=f"folded core: Q >= this (default {PROTEIN_DEFAULTS['q_folded']})")
    protein.add_argument("--q-unfolded", type=flag(FRACTION), metavar="Q",
                         help=f"unfolded core: Q <= this (default {PROTEIN_DEFAULTS['q_unfolded']})")
    protein.add_argument("--tica-lag", type=flag(POSITIVE_INT), metavar="N",
                         help=f"TICA lag time in reference frames (default {PROTEIN_DEFAULTS['tica_lag']})")
    protein.add_argument("--blocks", type=flag(POSITIVE_INT), metavar="N",
                         help=f"time blocks for the folded-fraction error without replicas "
                              f"(default {PROTEIN_DEFAULTS['blocks']})")


def _check_mode(args: argparse.Namespace) -> None:
    """Options of the other mode are refused by name, never ignored."""
    protein = getattr(args, "protein", False)
    stray = CV_ONLY if protein else PROTEIN_ONLY
    given = [f"--{k.replace('_', '-')}" for k in stray if getattr(args, k, None) is not None]
    if given:
        raise OptionError(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} only "
                          f"{'without' if protein else 'with'} --protein")
    if protein and args.folded is None:
        raise OptionError("--protein needs --folded FOLDED.pdb, the folded structure")
    if not protein and args.topology is None:
        raise OptionError("the trajectory needs --topology CG.pdb (the PDB flowforce cg wrote)")


def files(args: argparse.Namespace) -> CommandFiles:
    _check_mode(args)
    references = {f"--reference[{i}]" if len(args.reference) > 1 else "--reference": path
                  for i, path in enumerate(args.reference)}
    return CommandFiles(inputs={"TRAJ.dcd": args.trajectory, "--topology": args.topology, **references,
                                "--reference-topology": args.reference_topology, "--folded": args.folded},
                        outputs={"--out": args.out, "--plot": args.plot}, folders={"--plots": args.plots})


def run(args: argparse.Namespace) -> int:
    """Exit code 0 on success, 2 on bad input."""
    if args.protein:
        return _run_protein(args)
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
    args.mapping = args.mapping or "backbone"
    reference = mapped_reference_positions(reference_data, args.mapping)
    if reference.shape[1] != model.shape[1]:
        raise FlowforceError(f"the trajectory has {model.shape[1]} beads but --mapping {args.mapping} maps the "
                             f"reference to {reference.shape[1]}")
    comparison = compare_fes(reference, model, args.cv or PHI_PSI, bins=args.bins, pseudocount=args.pseudocount)
    from openmm_flowforce.analysis.bonded import bonds_of_pdb, compare_bonded, summary_line

    bonded = compare_bonded(reference, model, bonds_of_pdb(args.topology))
    reference_name = " ".join(str(p) for p in args.reference)
    report = {**comparison.report(), "bonded": bonded, "trajectory": str(args.trajectory),
              "reference": reference_name, "mapping": args.mapping, "skip": args.skip}
    atomic_write_bytes(args.out, (json.dumps(report, indent=1) + "\n").encode())
    if args.plot:
        plot_fes(comparison, args.plot, titles=(f"reference ({Path(args.reference[0]).name})",
                                                f"model ({Path(args.trajectory).name})"))
    d = comparison.divergences
    print(f"JS {d['js']:.4f} nats, KL(ref||model) {d['kl']:.4f}, KL(model||ref) {d['kl_reverse']:.4f} "
          f"on {' x '.join(str(len(e) - 1) for e in comparison.edges)} bins "
          f"({comparison.frames['reference']} reference / {comparison.frames['model']} model frames)")
    print(f"bonded terms: {summary_line(bonded)} (Wasserstein-1 of each bond and angle, in the report)")
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def _run_protein(args: argparse.Namespace) -> int:
    import json

    from openmm_flowforce.analysis.protein_frames import load_folded_structure, load_protein_frames
    from openmm_flowforce.analysis.protein_report import ProteinOptions, evaluate_protein, plot_protein
    from openmm_flowforce.io import atomic_write_bytes

    chosen = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in PROTEIN_DEFAULTS.items()}
    if args.reference_select is not None:
        raise OptionError("--reference-select does not apply with --protein (the C-alpha atoms are selected by name)")
    options = ProteinOptions(q_unfolded=chosen["q_unfolded"], q_folded=chosen["q_folded"], tica_lag=chosen["tica_lag"],
                             n_blocks=chosen["blocks"], bins=args.bins, pseudocount=args.pseudocount)
    if not options.q_unfolded < options.q_folded:
        raise OptionError(f"--q-unfolded {options.q_unfolded} must lie below --q-folded {options.q_folded}")
    if options.n_blocks < 2:
        raise OptionError(f"--blocks must be at least 2 for an error bar, got {options.n_blocks}")
    folded = load_folded_structure(args.folded)
    reference = load_protein_frames(args.reference[0] if len(args.reference) == 1 else args.reference,
                                    topology=args.reference_topology, stride=args.reference_stride)
    model = load_protein_frames(args.trajectory, topology=args.topology, skip=args.skip)
    evaluation = evaluate_protein(reference, model, folded, options)
    report = {**evaluation.report(), "reference": " ".join(str(p) for p in args.reference),
              "model": str(args.trajectory), "skip": args.skip}
    if args.plots:
        report["plots"] = [str(p) for p in plot_protein(evaluation, args.plots)]
    atomic_write_bytes(args.out, (json.dumps(report, indent=1) + "\n").encode())
    for name, result in (("reference", evaluation.reference), ("model", evaluation.model)):
        f = result.fraction
        print(f"{name}: {result.frames.n_frames} frames, folded fraction {f.value:.3f} +- {f.stderr:.3f} "
              f"({f.blocks} blocks), {result.events['folding']} folding / {result.events['unfolding']} unfolding "
              f"events, mean Q {result.q.mean():.3f}, mean CA-RMSD {result.rmsd_nm.mean():.3f} nm")
    for name, surface in evaluation.surfaces.items():
        print(f"FES {name}: JS {surface.divergences['js']:.4f} nats, KL(ref||model) {surface.divergences['kl']:.4f}")
    print(f"wrote {args.out}" + (f" and {len(report['plots'])} plots in {args.plots}" if args.plots else ""))
    return 0
