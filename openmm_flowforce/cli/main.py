"""``flowforce``: the command line entry point and its registry of subcommands.

Each subcommand is one entry in :data:`SUBCOMMANDS`: a one-line help, a function that adds
its arguments to an ``argparse`` parser, a function that runs it and returns the exit
code, and a function that names the files it reads and writes. Adding a command (md,
train, sample, export, simulate, cg, demo, ...) means adding an entry here; its
implementation lives in the library and is imported inside ``run`` so that
``flowforce --help`` stays fast.

:func:`main` is the one exit path of every command:

* before the command runs, its outputs are checked against its inputs and the file
  system (:func:`openmm_flowforce.io.check_outputs`): nothing is overwritten that is read,
  and no run ends in a write that could have been known to fail;
* a user's mistake — a bad flag (argparse), or a
  :class:`~openmm_flowforce.errors.FlowforceError` from anywhere in the package — is one
  line on stderr and exit status 2 (1 for a failed write, whose message says where the
  data went);
* Ctrl-C is one line saying which outputs were written and whether re-running continues,
  exit status 130; a full disk (or another fault of the machine, :data:`ENVIRONMENT_ERRNOS`)
  is one line and exit status 1;
* anything else is a bug and propagates with its traceback.

``--trust`` (commands that read files which can carry code) wraps the run in
:func:`openmm_flowforce.safety.trusted_files`.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from typing import Callable, NamedTuple, Sequence

from openmm_flowforce._version import __version__
from openmm_flowforce.cli.config import CommandFiles
from openmm_flowforce.errors import FlowforceError
from openmm_flowforce.cli import doctor
from openmm_flowforce.cli import md, sample, train
from openmm_flowforce.cli import export, simulate
from openmm_flowforce.cli import cg, convert, demo, evaluate
from openmm_flowforce.cli import sampler
from openmm_flowforce.cli import check_flow


def _no_files(args: argparse.Namespace) -> CommandFiles:
    return CommandFiles()


class Subcommand(NamedTuple):
    """One ``flowforce`` subcommand.

    Attributes:
        help: one line for ``flowforce --help``.
        add_arguments: adds its flags to its parser.
        run: runs it, returning the exit status.
        files: the files a run reads and writes (checked before ``run``).
        reads_code_carriers: it reads files that can hold code (OpenMM XML, force fields),
            so it gets ``--trust``.
    """

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    files: Callable[[argparse.Namespace], CommandFiles] = _no_files
    reads_code_carriers: bool = False


#: name → subcommand, in the order ``flowforce --help`` lists them.
SUBCOMMANDS: dict[str, Subcommand] = {
    "doctor": Subcommand(doctor.HELP, doctor.add_arguments, doctor.run),
    "md": Subcommand(md.HELP, md.add_arguments, md.run, md.files, reads_code_carriers=True),
    "convert": Subcommand(convert.HELP, convert.add_arguments, convert.run, convert.files),
    "train": Subcommand(train.HELP, train.add_arguments, train.run, train.files, reads_code_carriers=True),
    "sample": Subcommand(sample.HELP, sample.add_arguments, sample.run, sample.files, reads_code_carriers=True),
    "export": Subcommand(export.HELP, export.add_arguments, export.run, export.files),
    "simulate": Subcommand(simulate.HELP, simulate.add_arguments, simulate.run, simulate.files),
    "cg": Subcommand(cg.HELP, cg.add_arguments, cg.run, cg.files, reads_code_carriers=True),
    "evaluate": Subcommand(evaluate.HELP, evaluate.add_arguments, evaluate.run, evaluate.files,
                           reads_code_carriers=True),
    "demo": Subcommand(demo.HELP, demo.add_arguments, demo.run, demo.files, reads_code_carriers=True),
    "sampler": Subcommand(sampler.HELP, sampler.add_arguments, sampler.run, sampler.files),
    "check-flow": Subcommand(check_flow.HELP, check_flow.add_arguments, check_flow.run, check_flow.files),
}

#: Errors of the machine, not of the input or the code: a full disk or quota, a file too large,
#: a read-only or failing file system. One line and exit status 1, like a failed write.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})

TRUST_HELP = ("DANGEROUS: read files that can run code when loaded (an OpenMM PythonForce in a stored System, "
              "<Script> in a force field). Only for files you made yourself")

DESCRIPTION = """\
flowforce: learned molecular potentials from normalizing flows, run in OpenMM.

Units everywhere at the OpenMM boundary: positions nm, energies kJ/mol,
forces kJ/mol/nm, time ps, temperature K.
"""

EPILOG = """\
Start here:
  flowforce doctor          check that torch, OpenMM and openmm-torch work together
  flowforce doctor --help   options of one command (works for every command)

Exit status: 0 done, 1 the run failed (its message says why and what was kept),
2 bad input (one line names the file or option), 130 interrupted (Ctrl-C).
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): ``flowforce md: error: ...``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``flowforce`` parser with one subparser per entry of :data:`SUBCOMMANDS`."""
    parser = _Parser(
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
        if command.reads_code_carriers:
            sub.add_argument("--trust", action="store_true", help=TRUST_HELP)
        sub.set_defaults(_run=command.run)
    return parser


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _interrupted(files: CommandFiles, started: float) -> str:
    """What a Ctrl-C leaves: the outputs written since ``started``, and how to go on."""
    written = []
    for path in [*files.outputs.values(), *files.folders.values()]:
        try:
            if path is not None and os.stat(path).st_mtime >= started - 1.0:
                written.append(str(path))
        except OSError:
            pass
    if not written:
        return "nothing was written; run the command again to start over"
    then = ("run the same command again to continue where it stopped" if files.resumable else
            "these hold the work up to the interruption")
    return f"saved {', '.join(written)}; {then}"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand, return its exit code
    (0 done, 1 failed, 2 bad input, 130 interrupted)."""
    name, files, started = "flowforce", CommandFiles(), time.time()
    try:
        parser = build_parser()  # imports torch: Ctrl-C may come already here
        try:
            args = parser.parse_args(argv)
        except SystemExit as stop:  # --help, --version, or a bad flag (already reported)
            return stop.code if isinstance(stop.code, int) else 2
        if args.command is None:
            parser.print_help()
            return 2
        command = SUBCOMMANDS[args.command]
        name = " ".join(filter(None, ("flowforce", args.command, getattr(args, "sampler_command", None))))
        from openmm_flowforce.io import check_outputs
        from openmm_flowforce.safety import trusted_files

        files = command.files(args)
        with trusted_files(getattr(args, "trust", False)):
            check_outputs(files.outputs, files.inputs, files.folders)
            return int(args._run(args))
    except FlowforceError as error:
        print(f"{name}: error: {_one_line(error)}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt as stop:  # the trainers raise it with the signal's name, at a step boundary
        how = "SIGTERM" if stop.args and stop.args[0] == "SIGTERM" else "Ctrl-C"
        print(f"{name}: interrupted ({how}); {_interrupted(files, started)}", file=sys.stderr)
        return 130
    except OSError as error:
        if error.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f" ({error.filename})" if error.filename else ""
        print(f"{name}: failed: {error.strerror}{where}; {_interrupted(files, started)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
