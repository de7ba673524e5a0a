"""Collect the chignolin data curve (bench/chignolin_data_curve.sh) into one JSON and a plot.

Reads WORK/curve/d{frames}_s{seed}/report.json (``flowforce evaluate --protein``) and cg.csv
(``flowforce simulate --report``), and the reference's own comparisons refb_vs_refa.json and
ref8_halves.json; writes per run and per data size (mean ± s.d. over seeds): folded fraction,
folding + unfolding events, JS on the TICA and (Q, RMSD) surfaces, and the CG MD's ns/day.

    python bench/collect_chignolin_curve.py --work chig --out bench/results/chignolin/data_curve.json
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path


def summary(report: dict, side: str = "model") -> dict:
    ensemble = report["ensembles"][side]
    return {"folded_fraction": ensemble["folded_fraction"]["value"],
            "folded_fraction_stderr": ensemble["folded_fraction"]["stderr"],
            "events": ensemble["events"]["folding"] + ensemble["events"]["unfolding"],
            "q_mean": ensemble["q_mean"],
            "js_tica": report["surfaces"]["tica"]["divergences_nats"]["js"],
            "js_q_rmsd": report["surfaces"]["q_rmsd"]["divergences_nats"]["js"]}


def ns_per_day(csv: Path) -> float | None:
    """The simulate report's last "Speed (ns/day)" (None without a report)."""
    if not csv.exists():
        return None
    lines = [line for line in csv.read_text().splitlines() if line]
    header = [name.strip('#"') for name in lines[0].split(",")]
    if "Speed (ns/day)" not in header or len(lines) < 2:
        return None
    return float(lines[-1].split(",")[header.index("Speed (ns/day)")])


def plot(result: dict, path: Path) -> None:
    """Folded fraction and the two JS against the number of reference frames (seeds as dots,
    mean ± s.d. as bars); dotted: the 8-replica reference's folded fraction, and the JS
    between the two 4-replica reference sets (what the reference can resolve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(int(f) for f in result["by_frames"])
    floors = result["reference_self"].get("refb_vs_refa", {}).get("other", {})
    lines = {"folded_fraction": result["reference_folded_fraction"], **floors}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    panels = ((axes[0], ("folded_fraction",), "folded fraction"), (axes[1], ("js_tica", "js_q_rmsd"), "JS vs the 8 replicas (nats)"))
    for ax, keys, ylabel in panels:
        for i, key in enumerate(keys):
            means = [result["by_frames"][str(f)][key] for f in sizes]
            sds = [result["by_frames"][str(f)][key + "_sd"] or 0.0 for f in sizes]
            label = key.replace("js_", "JS ").replace("_", " ")
            ax.errorbar(sizes, means, yerr=sds, fmt="o-", color=f"C{i}", capsize=3, label=f"CG model: {label}")
            ax.plot([r["frames"] for r in result["runs"]], [r[key] for r in result["runs"]], ".", color=f"C{i}", alpha=0.4)
            if lines.get(key) is not None:
                ax.axhline(lines[key], color=f"C{i}", ls=":", lw=1,
                           label="reference, 8 replicas" if key == "folded_fraction" else f"{label}: replica set B vs A")
        ax.set(xscale="log", xlabel="reference frames used for the CG model", ylabel=ylabel)
        ax.minorticks_off()
        ax.set_xticks(sizes, [str(f) for f in sizes])
        ax.legend(fontsize=7)
    fig.suptitle("chignolin: flow-matching CG (Cα beads, MLP) from more data", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--plot", help="PNG of the curve")
    args = parser.parse_args(argv)
    work = Path(args.work)
    runs = []
    for report_path in sorted((work / "curve").glob("d*_s*/report.json")):
        match = re.fullmatch(r"d(\d+)_s(\d+)", report_path.parent.name)
        if not match:
            continue
        report = json.loads(report_path.read_text())
        reference_folded = report["ensembles"]["reference"]["folded_fraction"]["value"]
        runs.append({"frames": int(match[1]), "seed": int(match[2]), **summary(report),
                     "ns_per_day": ns_per_day(report_path.parent / "cg.csv")})
    if not runs:
        print(f"no runs under {work / 'curve'}", file=sys.stderr)
        return 2
    by_size = {}
    for frames in sorted({run["frames"] for run in runs}):
        group = [run for run in runs if run["frames"] == frames]
        row = {"seeds": len(group)}
        for key in ("folded_fraction", "events", "js_tica", "js_q_rmsd"):
            values = [run[key] for run in group]
            row[key] = statistics.mean(values)
            row[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else None
        by_size[str(frames)] = row
    reference = {}
    for name in ("refb_vs_refa", "ref8_halves"):
        path = work / f"{name}.json"
        if path.exists():
            report = json.loads(path.read_text())
            reference[name] = {"reference": summary(report, "reference"), "other": summary(report, "model")}
    result = {"runs": runs, "by_frames": by_size, "reference_self": reference,
              "reference_folded_fraction": reference_folded,
              "command": "bash bench/chignolin_data_curve.sh; python bench/collect_chignolin_curve.py"}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(result, Path(args.plot))
    for frames, row in by_size.items():
        sd = lambda key: f" ± {row[key + '_sd']:.2f}" if row[key + "_sd"] is not None else ""  # noqa: E731
        print(f"{frames:>5} frames, {row['seeds']} seeds: folded {row['folded_fraction']:.2f}{sd('folded_fraction')}, "
              f"events {row['events']:.0f}{sd('events')}, JS TICA {row['js_tica']:.3f}{sd('js_tica')}, "
              f"JS (Q, RMSD) {row['js_q_rmsd']:.3f}{sd('js_q_rmsd')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
