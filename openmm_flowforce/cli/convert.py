"""``flowforce convert``: trajectory files (anything mdtraj reads) + topology → a ``.npz``
dataset, the fast path of ``train``, ``cg`` and ``evaluate``; the reading lives in
:mod:`openmm_flowforce.data.trajectory`."""
from __future__ import annotations

import argparse

from openmm_flowforce.cli.config import CommandFiles
from openmm_flowforce.cli.data import add_data_arguments, data_inputs, load_data_from_args

HELP = "write a .npz dataset from MD trajectories (DCD, XTC, TRR, H5, NetCDF) and their topology"

EPILOG = """\
train, cg and evaluate also read the trajectories directly; the .npz is faster to load
again and carries its topology, forces and temperature with it. Trajectory files carry no
energies: the dataset's energies are zeros (nothing in training reads them).

Example:
  flowforce convert run1.xtc run2.xtc --topology ala.pdb --forces forces.npy --stride 10 \\
      --select 'not water' --temperature 300 --out ala.npz
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_data_arguments(parser, "TRAJ")
    parser.add_argument("--out", required=True, metavar="DATA.npz", help="dataset file to write")


def files(args: argparse.Namespace) -> CommandFiles:
    return CommandFiles(inputs=data_inputs(args, "TRAJ"), outputs={"--out": args.out})


def run(args: argparse.Namespace) -> int:
    """Exit code 0 on success, 2 on bad input."""
    from openmm_flowforce.data.dataset import save_dataset

    data = load_data_from_args(args)
    mapping = data.mapping()  # a CG-mapped dataset stays one, with its replicas and provenance
    save_dataset(args.out, topology=None if mapping is not None else data.topology, positions=data.positions,
                 energies=data.energies, temperature=data.temperature, forces=data.forces, source=data.source,
                 replica=data.replica, provenance=data.provenance or None, cg_mapping=mapping)
    print(f"wrote {args.out}: {data.n_frames} frames of {data.n_atoms} atoms at {data.temperature:g} K"
          + (", with forces" if data.forces is not None else ", no forces"))
    return 0
