"""The φ/ψ JS an evaluation of n samples cannot go below: n independent MD frames of one run
against the reference of another, with the binning of ``flowforce sampler evaluate``
(36 × 36, pseudocount 0.1). A sampler's JS from n samples is only meaningful above it, and a
reweighted JS behaves like one from about ESS·n samples.

    python bench/js_floor_alanine.py ref20.npz ref_vacuum.npz --n 30 100 300 1000 3000 \\
        --json bench/results/fab_alanine/js_floor.json
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", help="the evaluation's reference MD (.npz dataset)")
    parser.add_argument("other", help="another MD run of the same System (.npz dataset): the 'samples'")
    parser.add_argument("--n", type=int, nargs="+", default=[30, 100, 300, 1000, 3000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    from openmm_flowforce.analysis.molecule_sampler import evaluate_molecule_samples
    from openmm_flowforce.data.dataset import load_dataset

    reference, other = load_dataset(args.reference), load_dataset(args.other)
    ref = reference.positions.astype(np.float64)
    frames = other.positions.astype(np.float64)
    rng = np.random.default_rng(0)
    rows = []
    for n in args.n:
        if n > len(frames):
            parser.error(f"--n {n} exceeds the {len(frames)} frames of {args.other}")
        values = [evaluate_molecule_samples(frames[rng.choice(len(frames), n, replace=False)], np.zeros(n), ref,
                                            reference.topology)["raw"]["js_phi_psi"] for _ in range(args.repeats)]
        rows.append({"n": n, "js_mean": float(np.mean(values)), "js_sd": float(np.std(values)), "values": values})
        print(f"n = {n:>5}: JS {np.mean(values):.4f} ± {np.std(values):.4f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"reference": args.reference, "other": args.other, "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
