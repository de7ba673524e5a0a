"""``flowforce convert``: trajectory files (anything mdtraj reads) + topology → a ``.npz``
dataset, the fast path of ``train``, ``cg`` and ``evaluate``; the reading lives in
:mod:`openmm_flowforce.data.trajectory`."""
from __future__ import annotations

import argparse

import numpy as np

from openmm_flowforce.cli.config import CommandFiles
from openmm_flowforce.cli.data import add_data_arguments, data_inputs, load_data_from_args

HELP = ("write a .npz dataset from MD trajectories (DCD, XTC, TRR, H5, NetCDF) and their topology, "
        "or join several .npz datasets")

EPILOG = """\
train, cg and evaluate also read the trajectories directly; the .npz is faster to load
again and carries its topology, forces and temperature with it. Trajectory files carry no
energies: the dataset's energies are zeros (nothing in training reads them).

Several .npz datasets of one molecule, System and temperature (flowforce md runs made
apart: other seeds, other machines, later) are joined into one, their replicas kept apart
and renumbered, each file's provenance kept; train, cg and evaluate read several .npz the
same way.

Examples:
  flowforce convert run1.xtc run2.xtc --topology ala.pdb --forces forces.npy --stride 10 \\
      --select 'not water' --temperature 300 --out ala.npz
  flowforce convert ref.npz ref_more.npz --out ref_all.npz
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
                 timestep_fs=data.timestep_fs, save_every_ps=data.save_every_ps, system=data.system_xml or None,
                 replica=data.replica, provenance=data.provenance or None, cg_mapping=mapping)
    replicas = f", {len(np.unique(data.replica))} replicas" if data.replica is not None else ""
    print(f"wrote {args.out}: {data.n_frames} frames of {data.n_atoms} atoms at {data.temperature:g} K{replicas}"
          + (", with forces" if data.forces is not None else ", no forces")
          + (", with its System" if data.system_xml else ""))
    return 0
