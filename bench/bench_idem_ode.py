"""How many RK4 steps the probability-flow ODE likelihood of a trained iDEM model needs,
and what exact vs Hutchinson divergence cost and scatter.

For one checkpoint (``flowforce sampler train --method idem``) and n reference samples,
prints the NLL (−mean log q) for each ``--steps`` value with the exact divergence, and
with the Hutchinson estimate (``--probes`` probes, ``--repeats`` independent runs: their
spread is the estimator's error on the NLL), with the CPU time of each. Not a test.

    python bench/bench_idem_ode.py S.ckpt --reference /work/shared/data/dw4/test.npy \\
        [-n 200] [--steps 12 25 50 100] [--probes 1] [--repeats 3] [--out ode.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    from openmm_flowforce.analysis.sampler_report import load_reference
    from openmm_flowforce.samplers.common import import_methods, load_sampler

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--reference", required=True)
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--steps", type=int, nargs="+", default=[12, 25, 50, 100])
    parser.add_argument("--probes", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench_idem_ode.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import_methods()
    loaded = load_sampler(args.checkpoint)
    model = loaded.model
    x = torch.as_tensor(load_reference(args.reference, loaded.target, args.n))
    rows = []
    for steps in args.steps:
        model.ode_steps = steps
        for divergence, repeats in (("exact", 1), ("hutchinson", args.repeats)):
            model.divergence, model.n_probes = divergence, args.probes
            nlls, start = [], time.process_time()
            for r in range(repeats):
                nlls.append(float(-model.log_prob(x, torch.Generator().manual_seed(r)).double().mean()))
            cpu = (time.process_time() - start) / repeats
            spread = float(torch.tensor(nlls).std()) if repeats > 1 else 0.0
            rows.append({"ode_steps": steps, "divergence": divergence, "nll": sum(nlls) / repeats,
                         "nll_std_between_runs": spread, "cpu_s_per_run": cpu, "n": args.n})
            print(f"steps {steps:4d} {divergence:10s} NLL {rows[-1]['nll']:.4f} ± {spread:.4f} "
                  f"({cpu:.1f} s CPU per run of {args.n})", flush=True)
    command = " ".join(["python", "bench/bench_idem_ode.py", *(argv if argv is not None else sys.argv[1:])])
    with open(args.out, "w") as handle:
        json.dump({"command": command, "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
