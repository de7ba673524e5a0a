"""``flowforce export``: write a trained model as the TorchScript file openmm-torch runs, and
optionally as an AOTInductor package (``--compile``)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from openmm_flowforce.cli.config import CommandFiles, flag, legacy_user_errors
from openmm_flowforce.options import POSITIVE

HELP = "export a trained model as a TorchScript file for OpenMM (and, with --compile, an AOTInductor package)"

EPILOG = """\
The TorchScript file computes U(x) = -kT log q(x) in kJ/mol from positions (N, 3) in nm
and returns (energy, forces); TorchForce runs it with setOutputsForces(True). kT is fixed
at export time: by default the temperature of the data the model was fitted to (stored in
MODEL.ckpt); --temperature T exports the same q at another kT, with a warning that MD at T
then samples the fitted ensemble, not the system at T. CG models keep their own temperature.

--compile also writes MODEL.pt2 beside MODEL.pt: the same energy and forces compiled ahead
of time by AOTInductor (positions (N, 3) -> (energy, forces) in the package's dtype), for
the pythonforce backend or C++ (torch::inductor::AOTIModelPackageLoader). Compiling takes
minutes for a flow and needs a C++ compiler; a CUDA package must be compiled on the machine
with the GPU (--device cuda).

Examples:
  flowforce export model.ckpt --out model.pt
  flowforce export model.ckpt --out model.pt --compile --dtype float32
  flowforce simulate model.pt --topology molecule.pdb --steps 10000 --out traj.dcd
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("model", metavar="MODEL.ckpt", help="model checkpoint written by the trainer")
    parser.add_argument("--out", required=True, metavar="MODEL.pt", help="TorchScript file to write")
    parser.add_argument("--temperature", type=flag(POSITIVE), default=None, metavar="K",
                        help="temperature of the energy scale U = -kT log q, in kelvin (default: the temperature "
                             "of the data the model was fitted to; another one gets a warning that says what it "
                             "means; CG models only export at their own)")
    parser.add_argument("--compile", action="store_true",
                        help="also compile an AOTInductor package MODEL.pt2 beside MODEL.pt (takes minutes)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="device the package runs on (with --compile; default: cpu)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default=None,
                        help="dtype of the package's positions, energy, forces and networks (with --compile; "
                             "default: float32, geometry always float64)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="OpenMP threads of a CPU package's kernels, fixed at compile time (with --compile; "
                             "default: torch's thread count; 1 compiles serial code)")
    parser.add_argument("--batch", action="store_true",
                        help="compile positions (B, N, 3) -> (energy (B,), forces (B, N, 3)) with a dynamic batch B "
                             "(with --compile; for sampling and reweighting, not for MD)")


def _progress(start: float):
    def say(message: str) -> None:
        print(f"[{time.perf_counter() - start:5.0f} s] {message}", file=sys.stderr, flush=True)

    return say


def files(args: argparse.Namespace) -> CommandFiles:
    outputs = {"--out": args.out}
    if args.compile:
        outputs["--compile"] = str(Path(args.out).with_suffix(".pt2"))
    return CommandFiles(inputs={"MODEL.ckpt": args.model}, outputs=outputs)


def run(args: argparse.Namespace) -> int:
    """Exit code 0 on success, 2 on bad input, 1 when the export itself fails."""
    from openmm_flowforce.export.torchscript import export_potential, read_export_metadata
    from openmm_flowforce.potentials.cg_net import MODEL_KIND as CG_MODEL_KIND

    compile_only = [flag for flag, value in (("--device", args.device), ("--dtype", args.dtype),
                                             ("--threads", args.threads), ("--batch", args.batch or None))
                    if value is not None]
    if compile_only and not args.compile:
        print(f"flowforce export: error: {', '.join(compile_only)} only apply with --compile", file=sys.stderr)
        return 2
    import warnings

    try:
        with legacy_user_errors(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            path = export_potential(args.model, args.out, temperature=args.temperature)
        for warning in caught:
            if issubclass(warning.category, UserWarning):
                print(f"flowforce export: warning: {warning.message}", file=sys.stderr)
    except RuntimeError as error:
        print(f"flowforce export: export failed: {error}", file=sys.stderr)
        return 1
    meta = read_export_metadata(path)
    what = ("CG energy network (priors + net)" if meta.get("kind") == CG_MODEL_KIND
            else f"U = -kT log q at {meta['temperature']:g} K")
    print(f"wrote {path}: {meta['n_atoms']} particles, {what} "
          f"(load with openmmtorch.TorchForce('{path}') or `flowforce simulate {path} ...`)")
    if not args.compile:
        return 0
    return _compile(args, Path(path).with_suffix(".pt2"), float(meta["temperature"]))


def _compile(args: argparse.Namespace, out: Path, temperature: float) -> int:
    from openmm_flowforce.export.compiled import compile_package

    device, dtype = args.device or "cpu", args.dtype or "float32"
    say = _progress(time.perf_counter())
    say(f"compiling {out} for {device}, {dtype}{', batched' if args.batch else ''}: this takes minutes")
    try:
        compile_package(args.model, out, temperature=temperature, device=device, dtype=dtype, batch=args.batch,
                        threads=args.threads, progress=say)
    except (FileNotFoundError, ValueError, TypeError) as error:
        print(f"flowforce export: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - Inductor and the C++ compiler raise many types
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(f"flowforce export: compiling {out} failed ({type(error).__name__}: {first[:300]})", file=sys.stderr)
        return 1
    print(f"wrote {out}: AOTInductor package, {device}, {dtype} "
          f"(load with openmm_flowforce.export.compiled.load_package('{out}') or "
          f"make_force('{out}', backend='pythonforce'))")
    return 0
