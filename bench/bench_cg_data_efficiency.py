"""Data efficiency of flow-matching vs classic force matching (Köhler et al., JCTC 2023,
arXiv 2203.11167, Fig. 4 analogue) on alanine dipeptide, backbone mapping.

    python bench/bench_cg_data_efficiency.py [--ref-ns 20] [--frames 1000 5000 20000] [--workdir DIR]

One reference trajectory (amber14, vacuum, 300 K, `--ref-ns` ns, frames evenly spaced);
for each training-set size n, every (total/n)-th frame is used, so all sets span the same
time. For each n and each method (flow-matching: flow on the CG beads + CG net matched to
the flow's forces at its samples; force-matching: CG net matched to the mapped all-atom
forces), the CG model is exported and simulated in OpenMM (Langevin, 5 fs, `--cg-steps`),
and the φ/ψ free-energy surface of the CG MD is compared with the mapped full reference
(Jensen–Shannon divergence, 36×36 bins, pseudocount 0.1). Every stage writes its file in
DIR and is reused on a re-run, so an interrupted benchmark continues where it stopped.
Results: DIR/results.json and a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref-ns", type=float, default=20.0)
    parser.add_argument("--frames", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--methods", nargs="+", default=["flow-matching", "force-matching"])
    parser.add_argument("--cg-steps", type=int, default=200000, help="CG MD steps at 5 fs")
    parser.add_argument("--workdir", default="cg_efficiency")
    parser.add_argument("--quick", action="store_true", help="tiny models: checks that the script runs")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from openmm_flowforce.analysis.fes import (PHI_PSI, compare_fes, load_trajectory_positions,
                                               mapped_reference_positions)
    from openmm_flowforce.data.dataset import load_dataset, save_dataset
    from openmm_flowforce.export.torchscript import export_potential
    from openmm_flowforce.md.reference import run_reference_md
    from openmm_flowforce.md.simulate import simulate
    from openmm_flowforce.md.systems import load_system
    from openmm_flowforce.training.flow_matching import coarse_grain

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    reference = work / "reference.npz"
    if not reference.exists():
        topology, system, positions = load_system(system="alanine-dipeptide")
        n_max = max(args.frames)
        md = run_reference_md(topology, system, positions, time_ns=args.ref_ns,
                              save_every_ps=1000.0 * args.ref_ns / n_max, platform="Reference", seed=3)
        save_dataset(reference, topology=topology, positions=md["positions"], forces=md["forces"],
                     energies=md["energies"], temperature=300.0, system=system,
                     source=f"bench_cg_data_efficiency: {args.ref_ns:g} ns")
    data = load_dataset(reference)
    target = mapped_reference_positions(reference, "backbone")
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    options = {"flow": {"n_layers": 6, "hidden": [64, 64]}, "flow_train": {"steps": 3000},
               "flow_samples": 30000, "cg_train": {"steps": 3000}}
    if args.quick:
        options = {"flow": {"n_layers": 2, "hidden": [16, 16], "n_components": 4}, "flow_train": {"steps": 20},
                   "flow_samples": 500, "cg_train": {"steps": 20}}

    def flow_sample_js(stem: Path) -> float | None:
        """JS of the flow's own samples (flow-matching only): separates the flow from the CG net."""
        samples = stem.with_suffix(".samples.npz")
        if not samples.exists():
            return None
        with np.load(samples, allow_pickle=False) as arrays:
            return compare_fes(target, arrays["positions"], PHI_PSI).divergences["js"]

    def training_subset(n: int) -> slice:
        """Every (total/n)-th frame: all training sets span the same simulated time."""
        stride = max(1, data.n_frames // n)
        return slice(0, stride * n, stride)

    for n in args.frames:
        subset = training_subset(n)
        for method in args.methods:
            key = f"{method} n={n}"
            if key in results:
                continue
            stem = work / f"{method}_{n}"
            start = time.perf_counter()
            ckpt = stem.with_suffix(".ckpt")
            if not ckpt.exists():
                coarse_grain(data.positions[subset], data.topology, data.temperature, ckpt, "backbone", method,
                             forces=data.forces[subset], options=options)
            pt = export_potential(ckpt, stem.with_suffix(".pt"))
            dcd = stem.with_suffix(".dcd")
            if not dcd.exists():
                partial = stem.with_suffix(".partial.dcd")
                simulate(pt, ckpt.with_suffix(".pdb"), args.cg_steps, partial, platform="Reference",
                         timestep_fs=5.0, report_interval=40, progress=False)
                partial.replace(dcd)
            n_saved = args.cg_steps // 40
            model = load_trajectory_positions(dcd, ckpt.with_suffix(".pdb"), skip=min(25, n_saved // 10))
            js = compare_fes(target, model, PHI_PSI).divergences
            results[key] = {"frames": n, "method": method, **js, "seconds": time.perf_counter() - start}
            if method == "flow-matching":
                results[key]["js_flow_samples"] = flow_sample_js(stem)
            results_path.write_text(json.dumps(results, indent=1))
            print(key, json.dumps(results[key]), flush=True)
    print(f"{'frames':>7} " + " ".join(f"{m:>16}" for m in args.methods) + f" {'flow samples':>16}"
          "   (JS divergence of the φ/ψ surface, nats)")
    for n in args.frames:
        cells = [results.get(f"{m} n={n}", {}).get("js", np.nan) for m in args.methods]
        flow = results.get(f"flow-matching n={n}", {}).get("js_flow_samples")
        cells.append(np.nan if flow is None else flow)
        print(f"{n:>7} " + " ".join(f"{c:>16.4f}" for c in cells))
    subsets = {n: compare_fes(target, target[training_subset(n)], PHI_PSI).divergences["js"] for n in args.frames}
    print("JS of the training subsets themselves (the finite-sample floor): "
          + ", ".join(f"{n}: {js:.4f}" for n, js in subsets.items()))
    print(f"plot: {plot_results(results, args.methods, args.frames, subsets, work / 'data_efficiency.png')}")


def plot_results(results: dict, methods: list[str], frames: list[int], subsets: dict[int, float], path: Path) -> Path:
    """JS divergence against training frames, log-log, one line per method (+ the flow's own samples)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    floor = 1e-3  # a log axis cannot show 0
    for method in methods:
        ax.plot(frames, [max(results.get(f"{method} n={n}", {}).get("js", np.nan), floor) for n in frames],
                "o-", label=f"{method} (CG MD)")
    if "flow-matching" in methods:
        flow = [results.get(f"flow-matching n={n}", {}).get("js_flow_samples") for n in frames]
        ax.plot(frames, [np.nan if v is None else max(v, floor) for v in flow], "s--", label="flow samples")
    ax.plot(frames, [max(subsets[n], floor) for n in frames], ":", color="grey", label="training subset itself")
    ax.set(xscale="log", yscale="log", xlabel="training frames", ylabel="JS divergence of φ/ψ FES (nats)",
           title="alanine dipeptide, backbone CG")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
