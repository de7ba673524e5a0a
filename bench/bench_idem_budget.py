"""One iDEM training run on DW-4 at the CLI budget, scored between a Gaussian and the floor.

Trains exactly what ``flowforce sampler train --target dw4 --method idem --seed SEED``
trains (the same resolved options, overridden by ``KEY=VALUE`` YAML values), keeps the
checkpoint under ``--workdir/TAG_SEED/c.ckpt`` for ``flowforce sampler evaluate``, and
prints one JSON line: x-W2 (unaligned, 1000 SDE samples vs 1000 mean-free test samples),
the Gaussian and second-reference baselines of ``bench_samplers.baselines`` and the score
(W2_gauss − W2)/(W2_gauss − W2_floor), the median sample energy, the energy evaluations
and the wall time. Not a test.

    python bench/bench_idem_budget.py TAG SEED [KEY=VALUE ...] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    from bench_samplers import REFERENCE, baselines
    from openmm_flowforce.analysis.metrics import w2_samples
    from openmm_flowforce.analysis.sampler_report import load_reference
    from openmm_flowforce.samplers import get_method
    from openmm_flowforce.samplers.common import import_methods, make_target

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tag")
    parser.add_argument("seed", type=int)
    parser.add_argument("options", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--workdir", default="idem_budget")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import_methods()
    extra = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.options)}
    target, method = make_target("dw4"), get_method("idem")
    options = method.options({"seed": args.seed, **extra})
    model = method.build(target, options)
    folder = Path(args.workdir) / f"{args.tag}_{args.seed}"
    folder.mkdir(parents=True, exist_ok=True)
    start_cpu, start = time.process_time(), time.perf_counter()
    summary = method.train(model, target, options, folder / "c.ckpt", progress=False)
    cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start
    reference = load_reference(REFERENCE["dw4"], target, 1000, seed=0)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        x = target.remove_mean(method.sample(model, 1000).double())
    w2 = w2_samples(x.numpy(), reference)
    base = baselines("dw4", reference, 0)
    score = (base["w2_gaussian"] - w2) / (base["w2_gaussian"] - base["w2_floor"])
    print(json.dumps({"tag": args.tag, "seed": args.seed, "options": extra, "w2": w2, **base, "score": score,
                      "energy_median": float(target.energy(x).median()),
                      "energy_evaluations": summary["energy_evaluations"], "train_cpu_s": cpu,
                      "train_wall_s": wall}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
