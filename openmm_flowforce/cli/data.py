"""The data arguments shared by ``train``, ``cg`` and ``convert``: ``.npz`` datasets, or
trajectory files that mdtraj reads with ``--topology``, ``--forces``, ``--stride``,
``--select`` and ``--temperature`` (:func:`openmm_flowforce.data.trajectory.load_data`)."""
from __future__ import annotations

import argparse
from typing import Any

from openmm_flowforce.cli.config import flag
from openmm_flowforce.options import POSITIVE, POSITIVE_INT

DATA_HELP = ("one or more .npz datasets (flowforce md / flowforce convert; several are joined, their replicas kept "
             "apart), or trajectory files mdtraj reads (DCD, XTC, TRR, H5, NetCDF; several are joined in order) "
             "with --topology")


def add_data_arguments(parser: argparse.ArgumentParser, what: str = "DATA") -> None:
    """The positional data file(s) and the trajectory options."""
    parser.add_argument("data", nargs="+", metavar=what, help=DATA_HELP)
    group = parser.add_argument_group("trajectory input (not for .npz datasets)")
    group.add_argument("--topology", metavar="TOP", help="topology of the trajectory: PDB, prmtop, psf, gro or H5")
    group.add_argument("--forces", metavar="FORCES.npy",
                       help="forces in kJ/mol/nm, shape (frames, atoms, 3) for every frame and atom of the files")
    group.add_argument("--stride", type=flag(POSITIVE_INT), default=1, metavar="N", help="keep every N-th frame")
    group.add_argument("--select", metavar="SELECTION", help="mdtraj atom selection, e.g. 'not water'")
    group.add_argument("--temperature", type=flag(POSITIVE), metavar="K",
                       help="temperature of the trajectory's ensemble in K (default 300)")


def data_inputs(args: argparse.Namespace, label: str = "DATA") -> dict[str, Any]:
    """The input files, for :class:`~openmm_flowforce.cli.config.CommandFiles`."""
    inputs = {f"{label}[{i}]" if len(args.data) > 1 else label: path for i, path in enumerate(args.data)}
    inputs.update({"--topology": args.topology, "--forces": args.forces})
    return inputs


def load_data_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~openmm_flowforce.data.dataset.Dataset` the arguments name."""
    from openmm_flowforce.data.trajectory import load_data

    data = args.data[0] if len(args.data) == 1 else args.data
    return load_data(data, topology=args.topology, forces=args.forces, stride=args.stride, selection=args.select,
                     temperature=args.temperature)
