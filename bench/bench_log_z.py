"""log Z at equal energy evaluations: SNF and CRAFT beside FAB, AIS and the plain flow.

Trains ``snf``, ``reverse-kl`` (the plain flow SNF is built on, same size), ``fab`` and
``craft`` briefly on each target from the energy alone, then estimates log Z ``--repeats``
times per method with ``--budget`` target energy evaluations per estimate:

* ``ais``: AIS from the Gaussian π₀ = N(0, s²) (the CRAFT prior, no training), the same
  β schedule and HMC as CRAFT, n = budget / (1 + K·L) chains;
* ``craft``: one SMC pass, n = budget / (1 + K·(1 + L));
* ``snf``: path weights, n = budget / (1 + K·block_steps);
* ``reverse-kl`` and ``fab``: importance sampling with the trained flow, n = budget (FAB
  trained with a replay buffer of 16·batch, filled to 4·batch before its first update).

Reported per (target, method): the bias (mean log Ẑ − reference) and the std of log Ẑ
over repeats, the mean Kish ESS fraction of one estimate's weights, training energy
evaluations and wall time; for flows and SNF the NLL on reference samples (SNF: the
path estimate, an upper bound in expectation). Reference log Z: GMM-40 is normalised
(log Z = 0 exactly); for DW-4 a long AIS run (``--reference-chains`` chains,
``--reference-levels`` levels) whose own standard error is printed. Not a test.

    nice -n 10 python bench/bench_log_z.py [--targets gmm40 dw4] [--steps 100] \\
        [--budget 20000] [--repeats 5] [--out bench_log_z.json]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REFERENCE_SAMPLES = {"dw4": "/work/shared/data/dw4/test.npy"}
FLOW = dict(n_layers=4, hidden=32, n_components=8)


def _train(method_name: str, target, options: dict, workdir: Path):
    from openmm_flowforce.samplers import get_method

    method = get_method(method_name)
    options = method.options(options)
    model = method.build(target, options)
    summary = method.train(model, target, options, workdir / f"{method_name}.ckpt", progress=False)
    return method, model, options, summary


def _reference_log_z(target, name: str, chains: int, levels: int, scale: float, step: float) -> tuple[float, float]:
    from openmm_flowforce.analysis.metrics import log_partition
    from openmm_flowforce.samplers.ais import annealed_importance_sampling, beta_schedule
    from openmm_flowforce.samplers.common import particle_shape
    from openmm_flowforce.samplers.craft import annealing_log_densities
    from openmm_flowforce.samplers.transport import GaussianPrior

    if name == "gmm40":
        return 0.0, 0.0
    shape = particle_shape(target)
    prior = GaussianPrior(target.dim, scale, *(shape or (None, None)))
    torch.manual_seed(123)
    result = annealed_importance_sampling(prior.sample(chains), annealing_log_densities(prior, target.energy),
                                          beta_schedule(levels, "geometric"),
                                          torch.full((levels,), step, dtype=torch.float64), n_leapfrog=5)
    return log_partition(result.log_w)


def run_target(name: str, args, workdir: Path) -> list[dict]:
    from openmm_flowforce.analysis.metrics import ess, log_partition
    from openmm_flowforce.samplers.ais import annealed_importance_sampling
    from openmm_flowforce.samplers.common import make_target
    from openmm_flowforce.samplers.craft import annealing_log_densities
    from openmm_flowforce.samplers.flow_training import flow_presets

    target = make_target(name)
    preset = flow_presets(target)
    common = dict(steps=args.steps, batch_size=args.batch, seed=args.seed, log_every=10, checkpoint_every=10 ** 6)
    trained = {}
    for method_name, options in (
            ("reverse-kl", dict(common, **FLOW)),
            ("snf", dict(common, **FLOW, n_blocks=args.snf_blocks, block_steps=1)),
            ("fab", dict(common, **FLOW, min_buffer=4 * args.batch, buffer_size=16 * args.batch)),
            ("craft", dict(common, n_transitions=args.levels, n_layers=2, hidden=32))):
        print(f"== train {method_name} on {name}", file=sys.stderr)
        trained[method_name] = _train(method_name, target, options, workdir / name)
    ref, ref_se = _reference_log_z(target, name, args.reference_chains, args.reference_levels, preset["scale"],
                                   preset["step_size"])
    print(f"reference log Z for {name}: {ref:.4f} ± {ref_se:.4f}", file=sys.stderr)
    reference = None
    if name in REFERENCE_SAMPLES:
        reference = torch.as_tensor(np.load(REFERENCE_SAMPLES[name], allow_pickle=False)[:1000], dtype=torch.float64)
        reference = reference.reshape(len(reference), -1)
    elif hasattr(target, "sample"):
        reference = target.sample(1000)
    craft_method, craft_model, craft_opts, _ = trained["craft"]
    per_particle = {"ais": 1 + args.levels * 5, "craft": 1 + args.levels * (1 + int(craft_opts["n_leapfrog"])),
                    "snf": 1 + args.snf_blocks, "reverse-kl": 1, "fab": 1}
    rows = []
    for method_name in ("ais", "craft", "snf", "reverse-kl", "fab"):
        n = args.budget // per_particle[method_name]
        estimates, esses = [], []
        torch.manual_seed(args.seed + 7)
        start = time.perf_counter()
        for _ in range(args.repeats):
            if method_name == "ais":
                prior = craft_model.prior
                result = annealed_importance_sampling(prior.sample(n), annealing_log_densities(prior, target.energy),
                                                      craft_model.betas, torch.full((args.levels,), preset["step_size"],
                                                                                    dtype=torch.float64))
                log_w = result.log_w
            elif method_name in ("craft", "snf"):
                method, model = trained[method_name][:2]
                log_w = method.sample_with_log_weights(model, n)[1]
            else:
                model = trained[method_name][1]
                with torch.no_grad():
                    x, log_q = model.sample_and_log_prob(n)
                    log_w = -target.energy(x) - log_q
            log_w = torch.nan_to_num(log_w.detach(), nan=-math.inf)
            estimates.append(log_partition(log_w)[0])
            esses.append(ess(log_w))
        row = {"target": name, "method": method_name, "n_per_estimate": n, "budget": args.budget,
               "bias": float(np.mean(estimates) - ref), "std": float(np.std(estimates, ddof=1)),
               "ess": float(np.mean(esses)), "reference_log_z": ref, "reference_se": ref_se,
               "eval_wall_time_s": time.perf_counter() - start, "nll": None,
               "training_energy_evaluations": 0, "training_wall_time_s": 0.0}
        if method_name in trained:
            method, model, _, summary = trained[method_name]
            row["training_energy_evaluations"] = summary["energy_evaluations"]
            row["training_wall_time_s"] = summary["wall_time_s"]
            if reference is not None and method_name in ("snf", "reverse-kl", "fab"):
                row["nll"] = float(-method.log_prob(model, reference).mean())
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=["gmm40", "dw4"], choices=["gmm40", "dw4", "lj13"])
    parser.add_argument("--steps", type=int, default=100, help="training steps of every method")
    parser.add_argument("--batch", type=int, default=64, help="training batch (SMC particles for craft)")
    parser.add_argument("--levels", type=int, default=8, help="annealing levels of craft and ais")
    parser.add_argument("--snf-blocks", type=int, default=4, help="SNF stochastic layers (1 Langevin step each)")
    parser.add_argument("--budget", type=int, default=20000, help="energy evaluations per log Z estimate")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-chains", type=int, default=2000)
    parser.add_argument("--reference-levels", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_log_z.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="bench_log_z_"))
    rows = []
    columns = ("bias", "std", "ess", "nll", "n_per_estimate", "training_energy_evaluations", "training_wall_time_s")
    print("| target | method | " + " | ".join(columns) + " |")
    print("|" + "---|" * (len(columns) + 2), flush=True)
    for name in args.targets:
        (workdir / name).mkdir()
        new_rows = run_target(name, args, workdir)
        for row in new_rows:
            cells = [f"{row[c]:.3g}" if isinstance(row[c], float) else ("—" if row[c] is None else f"{row[c]:,}")
                     for c in columns]
            print(f"| {row['target']} | {row['method']} | " + " | ".join(cells) + " |", flush=True)
        rows.extend(new_rows)
        # written after every target, so a long run interrupted later keeps what it measured
        result = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                              "threads": torch.get_num_threads()},
                  "command": " ".join(["python", "bench/bench_log_z.py",
                                       *(argv if argv is not None else sys.argv[1:])]),
                  "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"-> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
