"""``flowforce sampler``: train, sample and evaluate energy-only samplers (iDEM, FAB, reverse KL).

Every method is looked up in the sampler registry after importing the modules listed in
:data:`openmm_flowforce.samplers.common.METHOD_MODULES`, so a method added there appears
here without touching this file.
"""
from __future__ import annotations

import argparse
import json

from openmm_flowforce.cli.config import CommandFiles, flag
from openmm_flowforce.errors import FlowforceError
from openmm_flowforce.options import POSITIVE_INT, SEED, Option

#: ``--flow`` (the same rule as the ``flow`` option of the flow sampler methods).
FLOW = Option(str, choices=("real", "equivariant", "internal"))
#: ``--divergence`` of ``evaluate`` (iDEM's option of the same name).
DIVERGENCE = Option(str, choices=("exact", "hutchinson"))

HELP = ("train, sample and evaluate energy-only samplers (iDEM, FAB, reverse KL, SNF, CRAFT, ESH) on toy targets "
        "and alanine dipeptide")

EPILOG = """\
examples:
  flowforce sampler train --target dw4 --method idem --out dw4.ckpt --steps 2000
  flowforce sampler train --target dw4 --method fab --flow equivariant --out dw4_fab.ckpt --steps 200
  flowforce sampler sample dw4.ckpt -n 1000 --out dw4_samples.npy
  flowforce sampler evaluate dw4.ckpt --reference dw4_test.npy -n 1000 --out dw4_report.json

Targets: gmm40, dw4, lj13, lj55, and the molecules alanine-dipeptide (vacuum) and
alanine-dipeptide-implicit (OBC2), the OpenMM energy of the System `flowforce md
--system alanine-dipeptide [--solvent implicit]` simulates (an unknown name lists the valid
ones). On a molecule the flow is the Boltzmann generator on internal coordinates (--flow
internal, the default there), normalised from the force field, never from MD frames; its
`evaluate` takes reference MD (.npz) and reports phi/psi JS of the flow and reweighted, ESS,
bond/angle W1 and energies (--plot for a picture):
  flowforce sampler train --target alanine-dipeptide --method fab --out ala_fab.ckpt --steps 100
  flowforce md --system alanine-dipeptide --time-ns 5 --out ala_md.npz
  flowforce sampler evaluate ala_fab.ckpt --reference ala_md.npz -n 2000 --out r.json --plot r.png
Methods: the registered ones (idem, and fab / reverse-kl where installed; an unknown name
lists them).

config file for `train` (YAML; command-line flags win):
  options: {n_mc: 500, batch: 256, steps: 3000, sigma_max: 3.0}   # the method's options
  target_options: {}                                             # keyword arguments of the target

Re-running `train` with the same --out continues from the checkpoint (exact resume, also
after Ctrl-C or SIGTERM, which finish the current step and save). Other options than the
checkpoint's (but steps, checkpoint_every, log_every) are refused, naming what differs;
--restart starts over and keeps the old file as S.ckpt.prev.
"""

#: ``flowforce sampler train --config``: top-level keys (the method checks its options,
#: the target its keyword arguments).
SAMPLER_TRAIN_SCHEMA: dict[str, Option] = {
    "options": Option(dict),
    "target_options": Option(dict),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    sub = parser.add_subparsers(dest="sampler_command", metavar="ACTION", title="actions")

    train = sub.add_parser("train", help="train a sampler from the target's energy alone",
                           description="train a sampler from the target's energy alone (resumes if --out exists)")
    train.add_argument("--target", required=True,
                       help="target name (gmm40, dw4, lj13, lj55, alanine-dipeptide, alanine-dipeptide-implicit)")
    train.add_argument("--method", required=True, help="sampler method (idem, fab, reverse-kl, snf, craft, ...)")
    train.add_argument("--out", required=True, metavar="S.ckpt", help="checkpoint to write (resumes if present)")
    train.add_argument("--steps", type=flag(POSITIVE_INT), help="total training steps (method default otherwise)")
    train.add_argument("--config", metavar="FILE.yaml", help="YAML with 'options' and 'target_options'")
    train.add_argument("--seed", type=flag(SEED), help="random seed (method default otherwise)")
    train.add_argument("--flow", type=flag(FLOW), metavar="{real,equivariant,internal}",
                       help="flow of fab / reverse-kl: 'real' (smooth real-space flow, the default on toy targets), "
                            "'equivariant' (SE(3)-equivariant augmented coupling flow, arXiv 2308.10364) or "
                            "'internal' (Boltzmann generator on internal coordinates; molecules, their default)")
    train.add_argument("--log", metavar="METRICS.jsonl", help="metrics log (default: S.ckpt with .jsonl)")
    train.add_argument("--restart", action="store_true",
                       help="start over even if S.ckpt exists (it is kept as S.ckpt.prev)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    sample = sub.add_parser("sample", help="draw samples from a trained sampler into a .npy file",
                            description="draw samples (flat, the target's coordinates) into a .npy file")
    sample.add_argument("checkpoint", metavar="S.ckpt")
    sample.add_argument("-n", "--n-samples", type=flag(POSITIVE_INT), required=True, help="number of samples")
    sample.add_argument("--out", required=True, metavar="X.npy")
    sample.add_argument("--seed", type=flag(SEED), default=0)

    evaluate = sub.add_parser("evaluate", help="compare a sampler's samples with reference samples",
                              description="W2 (unaligned as in iDEM, and aligned), energy W2, distance TV, "
                                          "NLL/ESS where the method has a density, cost; written as JSON")
    evaluate.add_argument("checkpoint", metavar="S.ckpt")
    evaluate.add_argument("--reference", required=True, metavar="PATH.npy", help="reference samples (m, dim)")
    evaluate.add_argument("-n", "--n-samples", type=flag(POSITIVE_INT), default=1000,
                          help="samples compared (default 1000)")
    evaluate.add_argument("--out", required=True, metavar="REPORT.json")
    evaluate.add_argument("--no-align", action="store_true",
                          help="skip the aligned W2 (minutes for 1000 LJ-13 samples)")
    evaluate.add_argument("--seed", type=flag(SEED), default=0)
    evaluate.add_argument("--plot", metavar="PLOT.png",
                          help="molecule targets: phi/psi histograms (reference | flow | reweighted) and energies")
    evaluate.add_argument("--ode-steps", type=flag(POSITIVE_INT), metavar="N",
                          help="iDEM: RK4 steps of the probability-flow ODE for NLL/ESS (default: the checkpoint's)")
    evaluate.add_argument("--divergence", type=flag(DIVERGENCE), metavar="{exact,hutchinson}",
                          help="iDEM: exact divergence (default) or the Hutchinson estimate (large systems)")
    evaluate.add_argument("--probes", type=flag(POSITIVE_INT), metavar="M",
                          help="iDEM: Hutchinson probes per sample (with --divergence hutchinson)")
    parser.set_defaults(_sampler_parser=parser)


def files(args: argparse.Namespace) -> CommandFiles:
    from openmm_flowforce.samplers.common import default_log_path

    if args.sampler_command == "train":
        return CommandFiles(inputs={"--config": args.config},
                            outputs={"--out": args.out, "--log": args.log or default_log_path(args.out)},
                            resumable=True)
    if args.sampler_command == "sample":
        return CommandFiles(inputs={"S.ckpt": args.checkpoint}, outputs={"--out": args.out})
    if args.sampler_command == "evaluate":
        return CommandFiles(inputs={"S.ckpt": args.checkpoint, "--reference": args.reference},
                            outputs={"--out": args.out, "--plot": args.plot})
    return CommandFiles()


def run(args: argparse.Namespace) -> int:
    if args.sampler_command is None:
        args._sampler_parser.print_help()
        return 2
    import torch

    torch.set_num_threads(1)
    return {"train": _train, "sample": _sample, "evaluate": _evaluate}[args.sampler_command](args)


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from openmm_flowforce.cli.config import load_config
    from openmm_flowforce.samplers import get_method, method_names
    from openmm_flowforce.samplers.common import default_log_path, import_methods, make_target

    cfg = load_config(args.config, SAMPLER_TRAIN_SCHEMA)
    import_methods()
    if args.method not in method_names():
        raise FlowforceError(f"unknown sampler method {args.method!r}; valid names: {', '.join(method_names())}")
    method = get_method(args.method)
    target_options = cfg.get("target_options", {})
    try:
        target = make_target(args.target, **target_options)
    except TypeError as error:  # a keyword the target's factory does not take (or a bad value type)
        if not target_options:
            raise  # then it is a bug, not the user's options
        raise FlowforceError(f"{args.config}: target {args.target!r} cannot be built from target_options "
                             f"{target_options} ({error})") from None
    options = dict(cfg.get("options", {}))
    if args.steps is not None:
        options["steps"] = args.steps
    if args.seed is not None:
        options["seed"] = args.seed
    if args.flow is not None:
        options["flow"] = args.flow
    options = method.options(options, where=str(args.config or ""))
    out = Path(args.out)
    if args.restart:
        from openmm_flowforce.engine import restart

        restart(out, args.log or default_log_path(out))
    model = method.build(target, options)
    summary = method.train(model, target, options, out, progress=not args.quiet,
                           log_path=args.log or default_log_path(out))
    resumed = summary.get("resumed_from")
    print(f"{args.method} on {args.target}: {summary['steps']} steps"
          f"{f' (resumed from step {resumed})' if resumed is not None else ''}, "
          f"{summary['energy_evaluations']:,} energy evaluations, {summary['wall_time_s']:.1f} s -> {out}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    import io

    import numpy as np
    import torch

    from openmm_flowforce.io import atomic_write_bytes
    from openmm_flowforce.samplers.common import import_methods, load_sampler

    import_methods()
    loaded = load_sampler(args.checkpoint)
    torch.manual_seed(args.seed)
    with torch.no_grad():
        x = loaded.method.sample(loaded.model, args.n_samples).detach().cpu().numpy()
    buffer = io.BytesIO()
    np.save(buffer, x)
    atomic_write_bytes(args.out, buffer.getvalue())
    print(f"{len(x)} samples of dimension {x.shape[1]} -> {args.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import time

    from openmm_flowforce.analysis.sampler_report import evaluate_sampler, load_reference
    from openmm_flowforce.io import atomic_write_bytes
    from openmm_flowforce.samplers.common import import_methods, load_sampler

    import_methods()
    given = {"ode_steps": args.ode_steps, "divergence": args.divergence, "n_probes": args.probes}
    loaded = load_sampler(args.checkpoint, evaluation_options={k: v for k, v in given.items() if v is not None})
    if getattr(loaded.target, "topology", None) is not None:
        return _evaluate_molecule(args, loaded)
    if args.plot is not None:
        raise FlowforceError("--plot applies to molecule targets (alanine-dipeptide...) only; remove it")
    reference = load_reference(args.reference, loaded.target, args.n_samples, seed=args.seed)
    start = time.perf_counter()
    report = evaluate_sampler(loaded.method, loaded.model, loaded.target, reference, align=not args.no_align,
                              seed=args.seed)
    summary = loaded.checkpoint.get("summary", {})
    report = {"method": loaded.checkpoint["method"], "target": loaded.checkpoint["target"]["name"], **report,
              "training_steps": summary.get("steps"), "energy_evaluations": summary.get("energy_evaluations"),
              "training_wall_time_s": summary.get("wall_time_s"),
              "evaluation_wall_time_s": time.perf_counter() - start,
              "w2_unaligned_definition": "iDEM x-W2: exact OT on squared Euclidean costs of flat (mean-free) "
                                         "coordinates, then sqrt; no rotation/permutation alignment"}
    atomic_write_bytes(args.out, (json.dumps(report, indent=2) + "\n").encode())
    shown = ("w2_unaligned", "w2_aligned", "w2_energy", "tv_distances", "nll", "ess", "energy_evaluations")
    print("  ".join(f"{k}={report[k]:.4g}" if isinstance(report[k], float) else f"{k}={report[k]}"
                    for k in shown))
    print(f"report -> {args.out}")
    return 0


def _evaluate_molecule(args: argparse.Namespace, loaded) -> int:
    """A molecule target against reference MD: phi/psi JS raw and reweighted, ESS, bonded W1, energies."""
    import numpy as np

    from openmm_flowforce.analysis.molecule_sampler import evaluate_molecule_sampler
    from openmm_flowforce.data.trajectory import load_data
    from openmm_flowforce.io import atomic_write_bytes

    target = loaded.target
    if not str(args.reference).endswith(".npz"):
        raise FlowforceError(f"--reference {args.reference}: for the molecule target {loaded.checkpoint['target']['name']} "
                             "give reference MD as a .npz dataset (flowforce md --system alanine-dipeptide ... --out REF.npz)")
    positions = np.asarray(load_data(args.reference).positions, dtype=np.float64)
    if positions.shape[1:] != (target.n_atoms, 3):
        raise FlowforceError(f"--reference {args.reference} has {positions.shape[1]} atoms; the target has {target.n_atoms}")
    report = evaluate_molecule_sampler(loaded.method, loaded.model, target, positions, args.n_samples, seed=args.seed,
                                       plot=args.plot, title=f"{loaded.checkpoint['method']} on "
                                                             f"{loaded.checkpoint['target']['name']}")
    summary = loaded.checkpoint.get("summary", {})
    report = {"method": loaded.checkpoint["method"], "target": loaded.checkpoint["target"]["name"], **report,
              "training_steps": summary.get("steps"), "energy_evaluations": summary.get("energy_evaluations"),
              "training_wall_time_s": summary.get("wall_time_s"), "reference": str(args.reference)}
    atomic_write_bytes(args.out, (json.dumps(report, indent=2) + "\n").encode())
    raw, rew = report["raw"], report["reweighted"]
    print(f"phi/psi JS {raw['js_phi_psi']:.4f} (flow), "
          f"{rew['js_phi_psi']:.4f} (reweighted) nats; ESS {report['ess']:.4f}; phi>0: flow {raw['phi_positive']:.3f}, "
          f"reweighted {rew['phi_positive']:.3f}, reference {report['phi_positive_reference']:.4f}; "
          f"{report['energy_evaluations']:,} energy evaluations")
    print(f"report -> {args.out}" + (f", plot -> {args.plot}" if args.plot else ""))
    return 0
