"""Error of iDEM's Monte Carlo score target S_K on DW-4 by noise level σ and K.

For n reference points noised at σ (x_t = x₀ + σε, mean-free), compares the clipped
estimate S_K (``idem.estimate_noised_score`` + ``clip_score_norm`` at 20 per particle, as
in training) with a K = 20000 estimate (a proxy for the exact noised score), over
``--repeats`` independent draws: the mean error norm and the scatter of S_K. Not a test.

    python bench/bench_idem_estimator.py [-n 50] [--sigmas 0.1 0.5 1 2 3] [--ks 200 1000 5000]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    from openmm_flowforce.analysis.sampler_report import load_reference
    from openmm_flowforce.samplers.common import make_target
    from openmm_flowforce.samplers.idem import clip_score_norm, estimate_noised_score

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=50)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.5, 1.0, 2.0, 3.0])
    parser.add_argument("--ks", type=int, nargs="+", default=[200, 1000, 5000])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--out", default="bench_idem_estimator.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    target = make_target("dw4")
    shape = (target.n_particles, target.spatial_dim)
    x0 = torch.as_tensor(load_reference("/work/shared/data/dw4/test.npy", target, args.n))
    g = torch.Generator().manual_seed(0)
    rows = []
    for sigma in args.sigmas:
        s = torch.full((args.n,), sigma, dtype=torch.float64)
        xt = target.remove_mean(x0 + sigma * torch.randn(x0.shape, dtype=torch.float64, generator=g))
        proxy = estimate_noised_score(target.energy, xt, s, 20000, shape, g)
        for k in args.ks:
            est = torch.stack([clip_score_norm(estimate_noised_score(target.energy, xt, s, k, shape, g), 20.0, shape)
                               for _ in range(args.repeats)])
            rows.append({"sigma": sigma, "k": k, "proxy_norm": float(proxy.norm(dim=1).mean()),
                         "error": float((est - proxy).norm(dim=2).mean()),
                         "scatter": float((est - est.mean(0)).norm(dim=2).mean())})
            r = rows[-1]
            print(f"σ {sigma:4.1f}  K {k:5d}  |S_20000| {r['proxy_norm']:6.2f}  |S_K − S_20000| {r['error']:6.2f}  "
                  f"scatter {r['scatter']:6.2f}", flush=True)
    with open(args.out, "w") as handle:
        json.dump({"command": " ".join(["python", "bench/bench_idem_estimator.py", *(argv or sys.argv[1:])]),
                   "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
