"""Several FAB-on-alanine curves (bench_fab_alanine.py result JSONs) in one figure:
φ/ψ JS of the flow samples and of the reweighted samples, and the ESS, against energy evaluations.

    python bench/plot_fab_curves.py --out bench/results/fab_alanine/curve_vacuum_spaces.png \\
        "internal=bench/results/fab_alanine/fab_alanine_vacuum.json" \\
        "cartesian=bench/results/fab_alanine/fab_alanine_vacuum_cartesian_ref20.json"
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("curves", nargs="+", metavar="LABEL=RESULT.json")
    parser.add_argument("--out", required=True, help="PNG")
    parser.add_argument("--title", default="FAB on alanine dipeptide (vacuum), from the energy alone")
    parser.add_argument("--floor", type=float, help="JS of as many independent MD frames as samples (the "
                                                     "evaluation's own floor), drawn on the JS panels")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for i, item in enumerate(args.curves):
        label, sep, path = item.partition("=")
        if not sep:
            parser.error(f"expected LABEL=RESULT.json, got {item!r}")
        curve = [row for row in json.loads(Path(path).read_text())["curve"] if row["energy_evaluations"] > 0]
        evals = [row["energy_evaluations"] for row in curve]
        axes[0].plot(evals, [row["raw"]["js_phi_psi"] for row in curve], "o-", color=f"C{i}", label=label, ms=3)
        axes[1].plot(evals, [row["reweighted"]["js_phi_psi"] for row in curve], "s-", color=f"C{i}", label=label, ms=3)
        axes[2].plot(evals, [max(row["ess"], 1e-6) for row in curve], "o-", color=f"C{i}", label=label, ms=3)
    for ax, title in zip(axes, ("φ/ψ JS, flow samples", "φ/ψ JS, reweighted by exp(−u)/q", "Kish ESS / n of 1000")):
        ax.set(xscale="log", yscale="log", xlabel="target energy evaluations", title=title)
        if ax is not axes[2]:
            ax.axhline(0.02, color="k", ls=":", lw=1, label="aim 0.02")
            if args.floor is not None:
                ax.axhline(args.floor, color="grey", ls="--", lw=1, label="independent MD frames, same n")
        ax.legend(fontsize=8)
    fig.suptitle(args.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
