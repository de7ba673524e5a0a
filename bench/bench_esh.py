"""ESH dynamics against HMC and MALA at equal gradient cost, on DW-4 and GMM-40.

ESH (Ver Steeg & Galstyan 2021, arXiv 2111.02434; :mod:`openmm_flowforce.samplers.esh`)
uses one gradient per leapfrog step and weights each state by e^r; HMC (L leapfrog steps,
Metropolis–Hastings, :func:`openmm_flowforce.samplers.ais.hmc_step`) uses L per
transition; MALA is HMC with L = 1. Every method runs ``--chains`` chains from the same
N(0, s²) start and is scored on the states of its first B gradient evaluations per chain,
for each budget B, after dropping the first 20 % of those states (the same rule for all):

* DW-4: W1 between the (weighted) interparticle-distance distribution and the reference
  test set (``$FLOWFORCE_SHARED_DATA/dw4/test.npy``), and the error of the mass beyond the
  barrier P(d > 4.5), the slow observable;
* GMM-40: total variation between the (weighted) occupancy of the 40 modes (nearest
  mean) and the exact 1/40 each, and the error of the mean energy (exact: 10⁵ exact samples).

Each method is run at each of ``--grid`` step sizes (per target below) and the best value
per budget is printed (an optimistic choice, the same for every method). Not a test.

    python bench/bench_esh.py [--targets dw4 gmm40] [--chains 64] [--budgets 500 1000 2000 4000] \\
        [--seed 0] [--out bench/results/bench_esh.json]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from openmm_flowforce.samplers.ais import PointState, hmc_step
from openmm_flowforce.samplers.esh import ESHState, energy_and_force, esh_leapfrog, random_direction
from openmm_flowforce.targets import get_target
from openmm_flowforce.targets.toys import pairwise_distances

SHARED = Path(os.environ.get("FLOWFORCE_SHARED_DATA") or "/work/shared/data")
#: Per target: starting std, ESH refreshment interval, step-size grids per method.
SETTINGS = {
    "dw4": dict(init=2.0, refresh=50, grid={"esh": (0.1, 0.25, 0.5), "hmc": (0.05, 0.1, 0.2, 0.4),
                                            "mala": (0.05, 0.1, 0.2, 0.4)}),
    "gmm40": dict(init=25.0, refresh=50, grid={"esh": (0.5, 1.0, 2.0), "hmc": (0.5, 1.0, 2.0),
                                               "mala": (0.5, 1.0, 2.0)}),
}
HMC_LEAPFROG = 5


def _project(target):
    n, k = getattr(target, "n_particles", None), getattr(target, "spatial_dim", None)
    if n is None:
        return None, target.dim
    return (lambda v: (v.reshape(-1, n, k) - v.reshape(-1, n, k).mean(1, keepdim=True)).reshape(v.shape)), (n - 1) * k


def run_esh(target, x0, eps, n_grad, refresh, gen):
    """States (T, B, D), log weights r (T, B), gradient evaluations per state (T,)."""
    project, d = _project(target)
    evaluate = energy_and_force(target.energy)
    x0 = project(x0) if project else x0
    state = ESHState.start(x0, random_direction(tuple(x0.shape), gen, x0.dtype, project), evaluate)
    xs, rs = [], []
    for k in range(n_grad - 1):
        if k > 0 and k % refresh == 0:
            state = ESHState(state.x, random_direction(tuple(x0.shape), gen, x0.dtype, project), state.r,
                             state.energy, state.force)
        state = esh_leapfrog(state, evaluate, eps, d)
        xs.append(state.x)
        rs.append(state.r)
    return torch.stack(xs), torch.stack(rs), torch.arange(2, n_grad + 1)


def run_hmc(target, x0, eps, n_grad, n_leapfrog):
    """Uniformly weighted HMC (MALA for n_leapfrog = 1) states, as :func:`run_esh`."""
    evaluate = energy_and_force(target.energy)

    def log_densities(x):
        u, f = evaluate(x)
        zero = torch.zeros_like(u)
        return zero, -u, torch.zeros_like(f), f

    state = PointState.at(x0, log_densities)
    xs, cost, spent, accept = [], [], 1, []
    while spent + n_leapfrog <= n_grad:
        state, prob = hmc_step(state, log_densities, 1.0, eps, n_leapfrog)
        spent += n_leapfrog
        xs.append(state.x)
        cost.append(spent)
        accept.append(float(prob.mean()))
    x = torch.stack(xs)
    return x, torch.zeros(x.shape[:2], dtype=x.dtype), torch.tensor(cost), float(np.mean(accept))


def _weighted_w1(values, weights, reference):
    """1-D Wasserstein-1 between a weighted sample and an unweighted one: ∫|F − G|."""
    grid = np.sort(np.concatenate([values, reference]))
    order = np.argsort(values)
    cdf_a = np.concatenate([[0.0], np.cumsum(weights[order])])[np.searchsorted(values[order], grid, side="right")]
    cdf_b = np.searchsorted(np.sort(reference), grid, side="right") / len(reference)
    return float(np.sum(np.abs(cdf_a - cdf_b)[:-1] * np.diff(grid)))


def score(target_name, target, x, r, reference):
    """Metrics of states x (T, B, D) with per-chain weights ∝ e^r."""
    w = torch.softmax(r.double(), dim=0) / r.shape[1]  # (T, B), sums to 1
    flat_w = w.reshape(-1)
    flat_x = x.reshape(-1, x.shape[-1])
    if target_name == "dw4":
        d = pairwise_distances(flat_x, 4, 2)  # (M, 6)
        dw = flat_w.repeat_interleave(6).numpy() / 6  # each state gives 6 distances
        far = float((flat_w[:, None] * (d > 4.5)).sum()) / 6
        return {"w1_distance": _weighted_w1(d.reshape(-1).numpy(), dw, reference["d"]),
                "err_p_far": abs(far - reference["p_far"])}
    nearest = torch.cdist(flat_x, target.means.to(flat_x)).argmin(1)
    occupancy = torch.zeros(40, dtype=torch.float64).index_add_(0, nearest, flat_w)
    energy = float((flat_w * target.energy(flat_x)).sum())
    return {"tv_modes": 0.5 * float((occupancy - 1 / 40).abs().sum()),
            "err_energy": abs(energy - reference["energy"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=["dw4", "gmm40"], choices=sorted(SETTINGS))
    parser.add_argument("--chains", type=int, default=64)
    parser.add_argument("--budgets", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/bench_esh.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    rows = []
    for name in args.targets:
        target, setting = get_target(name), SETTINGS[name]
        if name == "dw4":
            ref_d = pairwise_distances(torch.from_numpy(np.load(SHARED / "dw4" / "test.npy", allow_pickle=False)).double(), 4, 2)
            reference = {"d": ref_d.reshape(-1).numpy(), "p_far": float((ref_d > 4.5).double().mean())}
        else:
            exact = target.sample(100_000, generator=torch.Generator().manual_seed(1))
            reference = {"energy": float(target.energy(exact).mean())}
        x0 = setting["init"] * torch.randn(args.chains, target.dim, generator=torch.Generator().manual_seed(args.seed))
        n_grad = max(args.budgets)
        for method, grid in setting["grid"].items():
            best: dict[int, dict[str, float]] = {}
            for eps in grid:
                began = time.perf_counter()
                gen = torch.Generator().manual_seed(args.seed + 1)
                torch.manual_seed(args.seed + 1)  # HMC's momenta and MH draws use the global stream
                if method == "esh":
                    x, r, cost = run_esh(target, x0, eps, n_grad, setting["refresh"], gen)
                    extra = {}
                else:
                    x, r, cost, accept = run_hmc(target, x0, eps, n_grad, HMC_LEAPFROG if method == "hmc" else 1)
                    extra = {"accept": accept}
                seconds = time.perf_counter() - began
                for budget in args.budgets:
                    keep = int((cost <= budget).sum())
                    start = keep // 5
                    metrics = score(name, target, x[start:keep], r[start:keep], reference)
                    row = {"target": name, "method": method, "step_size": eps, "grad_evals_per_chain": budget,
                           **metrics, **extra, "seconds_full_run": seconds}
                    rows.append(row)
                    key = next(iter(metrics))
                    if budget not in best or metrics[key] < best[budget][key]:
                        best[budget] = row
            for budget in args.budgets:
                row = best[budget]
                text = ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                 if k not in ("target", "method", "grad_evals_per_chain", "seconds_full_run")
                                 and isinstance(v, float))
                print(f"{name:6s} {method:5s} B={budget:5d}  {text}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"chains": args.chains, "seed": args.seed, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
