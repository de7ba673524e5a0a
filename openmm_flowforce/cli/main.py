"""``flowforce``: the command line entry point and its registry of subcommands.

Each subcommand is one entry in :data:`SUBCOMMANDS`: a one-line help, a function that adds
its arguments to an ``argparse`` parser, and a function that runs it and returns the exit
code. Adding a command (md, train, sample, export, simulate, cg, demo, ...) means adding
an entry here; its implementation lives in the library and is imported inside ``run`` so
that ``flowforce --help`` stays fast.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NamedTuple, Sequence

from openmm_flowforce._version import __version__
from openmm_flowforce.cli import doctor
from openmm_flowforce.cli import md, sample, train
from openmm_flowforce.cli import export, simulate
from openmm_flowforce.cli import cg, demo, evaluate
from openmm_flowforce.cli import sampler


class Subcommand(NamedTuple):
    """One ``flowforce`` subcommand."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


#: name → subcommand, in the order ``flowforce --help`` lists them.
SUBCOMMANDS: dict[str, Subcommand] = {
    "doctor": Subcommand(doctor.HELP, doctor.add_arguments, doctor.run),
    "md": Subcommand(md.HELP, md.add_arguments, md.run),
    "train": Subcommand(train.HELP, train.add_arguments, train.run),
    "sample": Subcommand(sample.HELP, sample.add_arguments, sample.run),
    "export": Subcommand(export.HELP, export.add_arguments, export.run),
    "simulate": Subcommand(simulate.HELP, simulate.add_arguments, simulate.run),
    "cg": Subcommand(cg.HELP, cg.add_arguments, cg.run),
    "evaluate": Subcommand(evaluate.HELP, evaluate.add_arguments, evaluate.run),
    "demo": Subcommand(demo.HELP, demo.add_arguments, demo.run),
    "sampler": Subcommand(sampler.HELP, sampler.add_arguments, sampler.run),
}

DESCRIPTION = """\
flowforce: learned molecular potentials from normalizing flows, run in OpenMM.

Units everywhere at the OpenMM boundary: positions nm, energies kJ/mol,
forces kJ/mol/nm, time ps, temperature K.
"""

EPILOG = """\
Start here:
  flowforce doctor          check that torch, OpenMM and openmm-torch work together
  flowforce doctor --help   options of one command (works for every command)
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``flowforce`` parser with one subparser per entry of :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="flowforce",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, command in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand, return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args._run(args))


if __name__ == "__main__":
    sys.exit(main())
