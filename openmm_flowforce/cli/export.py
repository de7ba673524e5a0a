"""``flowforce export``: write a trained model as the TorchScript file openmm-torch runs."""
from __future__ import annotations

import argparse
import sys

from openmm_flowforce.cli.config import CommandFiles, flag, legacy_user_errors
from openmm_flowforce.options import POSITIVE

HELP = "export a trained model checkpoint as a TorchScript file for OpenMM (openmmtorch.TorchForce)"

EPILOG = """\
The file computes U(x) = -kT log q(x) in kJ/mol from positions (N, 3) in nm; forces come
from autograd inside OpenMM. kT is fixed at export time (--temperature).

Example:
  flowforce export model.ckpt --out model.pt --temperature 300
  flowforce simulate model.pt --topology molecule.pdb --steps 10000 --out traj.dcd
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("model", metavar="MODEL.ckpt", help="model checkpoint written by the trainer")
    parser.add_argument("--out", required=True, metavar="MODEL.pt", help="TorchScript file to write")
    parser.add_argument("--temperature", type=flag(POSITIVE), default=300.0, metavar="K",
                        help="temperature of the energy scale U = -kT log q, in kelvin (default: 300)")


def files(args: argparse.Namespace) -> CommandFiles:
    return CommandFiles(inputs={"MODEL.ckpt": args.model}, outputs={"--out": args.out})


def run(args: argparse.Namespace) -> int:
    """Exit code 0 on success, 2 on bad input, 1 when the export itself fails."""
    from openmm_flowforce.export.torchscript import export_potential, read_export_metadata
    from openmm_flowforce.potentials.cg_net import MODEL_KIND as CG_MODEL_KIND

    try:
        with legacy_user_errors():
            path = export_potential(args.model, args.out, temperature=args.temperature)
    except RuntimeError as error:
        print(f"flowforce export: export failed: {error}", file=sys.stderr)
        return 1
    meta = read_export_metadata(path)
    what = ("CG energy network (priors + net)" if meta.get("kind") == CG_MODEL_KIND
            else f"U = -kT log q at {meta['temperature']:g} K")
    print(f"wrote {path}: {meta['n_atoms']} particles, {what} "
          f"(load with openmmtorch.TorchForce('{path}') or `flowforce simulate {path} ...`)")
    return 0
