"""Inverse stability of flows trained on alanine dipeptide ICs, with and without ``bi_lipschitz``.

Each (transform, loss) pair trains a coupling flow on the unit-cube internal coordinates of
the first 80 % of a ``flowforce md`` file for ``--steps`` Adam steps and reports the held-out
NLL and the float64 diagnostic of :func:`openmm_flowforce.analysis.flow_stability.check_flow`
(round trips, inverse Lipschitz estimate, warnings) on the held-out frames.

    python bench/bench_flow_stability.py ala.npz [--steps 300] [--transforms spline,smooth,ispline]
        [--penalty 0.001]
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def _ics(path: str) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    from openmm_flowforce.coordinates import InternalCoordinates
    from openmm_flowforce.data.trajectory import load_data

    data = load_data(path)
    x = torch.as_tensor(data.positions, dtype=torch.float64)
    n_train = int(0.8 * len(x))
    ic = InternalCoordinates.from_topology(data.topology, x[:n_train].numpy())
    with torch.no_grad():
        u, _ = ic.to_unit(x, check=False)
    return u[:n_train].float(), u[n_train:], ic.periodic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--components", type=int, default=8)
    parser.add_argument("--transforms", default="spline,smooth,ispline")
    parser.add_argument("--penalty", type=float, default=1e-3, help="weight of bi_lipschitz in the second run")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from openmm_flowforce.analysis.flow_stability import check_flow
    from openmm_flowforce.flows import CouplingFlow
    from openmm_flowforce.training.losses import weighted_loss

    train, val, periodic = _ics(args.data)
    rows = []
    for transform in args.transforms.split(","):
        for weights in ({"nll": 1.0}, {"nll": 1.0, "bi_lipschitz": args.penalty}):
            torch.manual_seed(0)
            flow = CouplingFlow(periodic, transform=transform, n_layers=args.layers, hidden=args.hidden,
                                n_components=args.components).float()
            opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
            g = torch.Generator().manual_seed(0)
            start = time.perf_counter()
            for _ in range(args.steps):
                idx = torch.randint(len(train), (args.batch,), generator=g)
                loss, _ = weighted_loss(flow, weights, x=train[idx])
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(flow.parameters(), 100.0)
                opt.step()
            train_s = time.perf_counter() - start
            with torch.no_grad():
                val_nll = float(-flow.log_prob(val.float()).mean())
            report = check_flow(flow, val, n_samples=1000, n_jacobian=16)
            rows.append({"transform": transform, "loss": ",".join(f"{k}={v:g}" for k, v in weights.items()),
                         "val_nll": val_nll, "train_s": train_s,
                         "round_trip_data": report["round_trip"]["data_to_latent_to_data"]["max"],
                         "round_trip_latent": report["round_trip"]["latent_to_data_to_latent"]["max"],
                         "log_q_mismatch": report["log_q_consistency"]["max"],
                         "inverse_lipschitz": report["lipschitz"]["inverse"], "warnings": len(report["warnings"])})
            r = rows[-1]
            print(f"{r['transform']:<8} {r['loss']:<26} NLL {r['val_nll']:7.2f}  round trip {r['round_trip_data']:.1e} / "
                  f"{r['round_trip_latent']:.1e}  log q {r['log_q_mismatch']:.1e}  inv. Lipschitz "
                  f"{r['inverse_lipschitz']:.1e}  warnings {r['warnings']}  ({r['train_s']:.0f} s)", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
