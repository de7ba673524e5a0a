"""``flowforce doctor``: argument parsing and printing; the checks live in :mod:`openmm_flowforce.md.doctor`."""
from __future__ import annotations

import argparse
import json

HELP = "check that torch, OpenMM and openmm-torch work together on every OpenMM platform"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    parser.add_argument(
        "--platform",
        action="append",
        metavar="NAME",
        help="check only this OpenMM platform (repeatable; default: every available platform)",
    )
    parser.add_argument("--native", action="store_true",
                        help="also compile a toy AOTInductor package (tens of seconds) and run it through the "
                             "native plugin on every platform")


def run(args: argparse.Namespace) -> int:
    """Run the doctor; exit code 0 only when every check passed, 1 otherwise, 2 on bad input."""
    from openmm_flowforce.md.doctor import format_report, run_doctor

    report = run_doctor(platforms=args.platform, native=args.native)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_report(report))
    return 0 if report.ok else 1
