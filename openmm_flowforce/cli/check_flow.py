"""``flowforce check-flow``: is a trained flow numerically invertible? Round trips and per-layer
bi-Lipschitz estimates in float64, with warnings (:mod:`openmm_flowforce.analysis.flow_stability`)."""
from __future__ import annotations

import argparse

from openmm_flowforce.cli.config import CommandFiles, flag
from openmm_flowforce.options import POSITIVE_INT, SEED

HELP = "check that a trained flow inverts reliably (round trips, per-layer Lipschitz estimates, float64)"

EPILOG = """\
What it measures (in float64, on the flow over the unit cube of internal coordinates):
  round trips data -> latent -> data (on --data frames) and latent -> data -> latent (on
  --samples uniform latent points); the same per layer; the largest and smallest singular
  values of every layer's Jacobian at data and sample points (--jacobian-points of each);
  and how far log q reported with a sample is from log q recomputed at it.

Warnings (exit status stays 0; the report's "ok" is false):
  round trip > 1e-8            sampling unreliable (>= 1e4-fold error amplification; in
                               float32 the same amplification misplaces samples by >= 1e-2)
  |log q mismatch| > 0.01 nats reweighting unreliable (1% systematic weight error)
  inverse Lipschitz > 1e8      float32 sampling loses every digit
  A flagged model can be retrained with the loss term bi_lipschitz (e.g.
  --loss nll=1,bi_lipschitz=0.001), which penalises steep layers in both directions.

Without --data the round trip data -> latent -> data uses flow samples instead.

Example:
  flowforce check-flow ala2.ckpt --data ala2.npz --samples 2000 --out check.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("model", metavar="MODEL.ckpt", help="model file written by `flowforce train`")
    parser.add_argument("--data", metavar="DATA.npz", help="frames to check at (flowforce md output)")
    parser.add_argument("--max-frames", type=flag(POSITIVE_INT), default=2000, metavar="N",
                        help="use at most N frames of --data, evenly spaced (default 2000)")
    parser.add_argument("--samples", type=flag(POSITIVE_INT), default=1000, metavar="N",
                        help="latent points for the sampling direction (default 1000)")
    parser.add_argument("--jacobian-points", type=flag(POSITIVE_INT), default=32, metavar="N",
                        help="points of the data and of the samples where layer Jacobians are taken (default 32)")
    parser.add_argument("--seed", type=flag(SEED), default=0, help="seed of the latent points (default 0)")
    parser.add_argument("--out", metavar="REPORT.json", help="write the full report as JSON")


def files(args: argparse.Namespace) -> CommandFiles:
    return CommandFiles(inputs={"MODEL.ckpt": args.model, "--data": args.data}, outputs={"--out": args.out})


def run(args: argparse.Namespace) -> int:
    import json

    import numpy as np
    import torch

    from openmm_flowforce.analysis.flow_stability import check_flow
    from openmm_flowforce.errors import FlowforceError
    from openmm_flowforce.io import atomic_write_bytes
    from openmm_flowforce.potentials.boltzmann import load_boltzmann_generator

    torch.set_num_threads(1)
    model = load_boltzmann_generator(args.model, dtype=torch.float64)
    if args.data:
        from openmm_flowforce.data.trajectory import load_data

        data = load_data(args.data)
        if data.n_atoms != model.n_atoms:
            raise FlowforceError(f"--data {args.data} has {data.n_atoms} atoms but the model has {model.n_atoms}; "
                                 "give the data file the model was trained on")
        frames = np.unique(np.linspace(0, data.n_frames - 1, min(args.max_frames, data.n_frames)).astype(int))
        with torch.no_grad():
            u, _ = model.coordinates.to_unit(torch.as_tensor(data.positions[frames], dtype=torch.float64),
                                             check=False)
        source = f"{len(frames)} frames of {args.data}"
    else:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(args.seed + 1)
            u = model.flow.sample(min(args.max_frames, args.samples))
        source = f"{len(u)} flow samples (no --data)"
    report = check_flow(model.flow, u, n_samples=args.samples, n_jacobian=args.jacobian_points, seed=args.seed)
    report = {"model": str(args.model), "points": source, **report}
    rt = report["round_trip"]
    print(f"check-flow {args.model} on {source}, {args.samples} latent samples (float64):")
    print(f"  round trip data->latent->data  max {rt['data_to_latent_to_data']['max']:.2e}  "
          f"median {rt['data_to_latent_to_data']['median']:.2e}")
    print(f"  round trip latent->data->latent max {rt['latent_to_data_to_latent']['max']:.2e}  "
          f"median {rt['latent_to_data_to_latent']['median']:.2e}")
    print(f"  |log q mismatch| on samples     max {report['log_q_consistency']['max']:.2e} nats")
    print(f"  Lipschitz estimates: forward {report['lipschitz']['forward']:.2e}, "
          f"inverse {report['lipschitz']['inverse']:.2e}")
    for layer in report["layers"]:
        print(f"    layer {layer['layer']}: sigma in [{1.0 / layer['inverse_lipschitz']:.2e}, "
              f"{layer['lipschitz']:.2e}], round trip {layer['round_trip_max']:.1e}")
    for warning in report["warnings"]:
        print(f"  WARNING: {warning}")
    print("  ok: no warnings" if report["ok"] else f"  {len(report['warnings'])} warning(s)")
    if args.out:
        atomic_write_bytes(args.out, (json.dumps(report, indent=2) + "\n").encode())
    return 0
