"""Training-step and sampling time: smooth vs spline vs I-spline flows vs zuko's NSF; NLL.

Same data, same sizes, one run. Data: the unit-cube internal coordinates of alanine
dipeptide (D = 60) made from the built-in PDB with Gaussian noise, or with ``--data`` those
of the MD frames (whose fit makes the torsions circles); the timings depend on the data
only through which dimensions are periodic.

    python bench/bench_flows.py [--threads 1] [--batch 256] [--repeats 20]
        [--data ala.npz --nll-steps 300]

With ``--data`` (a ``flowforce md`` file) each flow is also trained by NLL for
``--nll-steps`` Adam steps on the internal coordinates of the first 80 % of the frames
and its mean NLL on the last 20 % is reported, in nats per frame on the unit cube
(the same coordinates for every flow, so the numbers compare; lower is better).

zuko is optional (``pip install -e ".[bench]"``); its NSF is a masked autoregressive
flow on ℝ^D with a Gaussian base, so its inverse (sampling) takes D sequential passes.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _data(n: int) -> tuple[torch.Tensor, list[bool]]:
    from openmm import app, unit

    from openmm_flowforce.coordinates import InternalCoordinates
    from openmm_flowforce.data import alanine_dipeptide_pdb

    pdb = app.PDBFile(alanine_dipeptide_pdb())
    x0 = np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    x = torch.as_tensor(x0)[None] + 0.01 * torch.randn(n, *x0.shape, dtype=torch.float64)
    ic = InternalCoordinates.from_topology(pdb.topology, x.numpy())
    with torch.no_grad():
        u, _ = ic.to_unit(x)
    return u.float(), ic.periodic


_IC_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor, list[bool]]] = {}


def _alanine_ics(path: str) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """Unit-cube internal coordinates (float32) of a ``flowforce md`` file: train, held-out, periodic."""
    if path not in _IC_CACHE:
        from openmm_flowforce.coordinates import InternalCoordinates
        from openmm_flowforce.data.trajectory import load_data

        data = load_data(path)
        x = torch.as_tensor(data.positions, dtype=torch.float64)
        n_train = int(0.8 * len(x))
        ic = InternalCoordinates.from_topology(data.topology, x[:n_train].numpy())
        with torch.no_grad():
            u, _ = ic.to_unit(x, check=False)
        _IC_CACHE[path] = (u[:n_train].float(), u[n_train:].float(), ic.periodic)
    return _IC_CACHE[path]


def periodic_of(path: str) -> list[bool]:
    return _alanine_ics(path)[2]


def _held_out_nll(transform: str, periodic: list[bool], args: argparse.Namespace) -> float:
    """Mean held-out NLL after ``args.nll_steps`` Adam steps (lr 1e-3, cosine-free) from seed 0."""
    from openmm_flowforce.flows import CouplingFlow

    train, val, _ = _alanine_ics(args.data)
    torch.manual_seed(0)
    flow = CouplingFlow(periodic, transform=transform, n_layers=args.layers, hidden=args.hidden,
                        n_components=args.components).float()
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(args.nll_steps):
        idx = torch.randint(len(train), (args.batch,), generator=g)
        opt.zero_grad()
        (-flow.log_prob(train[idx]).mean()).backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 100.0)
        opt.step()
    with torch.no_grad():
        return float(-flow.log_prob(val).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--components", type=int, default=8)
    parser.add_argument("--transforms", default="smooth,spline,ispline", help="comma-separated family names")
    parser.add_argument("--data", help="flowforce md file for the NLL column")
    parser.add_argument("--nll-steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from openmm_flowforce.flows import CouplingFlow

    u, periodic = (_alanine_ics(args.data)[0], periodic_of(args.data)) if args.data else _data(4096)
    batch = u[: args.batch]
    rows = []
    models = {name: CouplingFlow(periodic, transform=name, n_layers=args.layers, hidden=args.hidden,
                                 n_components=args.components).float() for name in args.transforms.split(",")}
    try:
        import zuko
        # unit cube → ℝ via logit so all three see the same data
        models["zuko-NSF"] = zuko.flows.NSF(len(periodic), bins=args.components, transforms=args.layers,
                                            hidden_features=(args.hidden, args.hidden))
    except ImportError:
        print("zuko not installed: skipping its NSF (pip install zuko)")

    for name, model in models.items():
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        if name.startswith("zuko"):
            y = torch.logit(batch.clamp(1e-6, 1 - 1e-6))
            log_prob = lambda: model().log_prob(y)
            sample = lambda: model().sample((args.samples,))
        else:
            log_prob = lambda: model.log_prob(batch)
            sample = lambda: model.sample(args.samples)

        def step():
            opt.zero_grad()
            (-log_prob().mean()).backward()
            opt.step()

        t_step = _time(step, args.repeats)
        with torch.no_grad():
            t_sample = _time(sample, max(3, args.repeats // 4))
        row = {"model": name, "params": sum(p.numel() for p in model.parameters()),
               "train_step_ms": 1e3 * t_step, "sample_ms": 1e3 * t_sample}
        if args.data and not name.startswith("zuko"):
            row["val_nll"] = _held_out_nll(name, periodic, args)
        rows.append(row)

    print(f"D={len(periodic)} ({sum(periodic)} periodic), batch {args.batch}, {args.samples} samples, "
          f"{args.layers} layers, hidden {args.hidden}, K={args.components}, float32, "
          f"{args.threads} thread(s), torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"{'model':<10} {'params':>8} {'train step (ms)':>16} {'sample (ms)':>12} {'held-out NLL':>13}")
    for r in rows:
        nll = f"{r['val_nll']:>13.2f}" if "val_nll" in r else f"{'-':>13}"
        print(f"{r['model']:<10} {r['params']:>8} {r['train_step_ms']:>16.1f} {r['sample_ms']:>12.1f} {nll}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
