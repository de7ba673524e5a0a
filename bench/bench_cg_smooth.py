"""Smooth flow forces from little data (issue 15 §1): which flow-matching variant gives a CG
model whose MD reproduces the reference, at 1000 training frames and several seeds.

    python bench/bench_cg_smooth.py --reference ref20.npz --frames 1000 --seeds 0 1 2 \\
        --variants base internal jitter jitter+internal --workdir smooth

Alanine dipeptide, backbone mapping (5 beads). The training set is every (T/N)-th frame of the
reference (all sets span the same simulated time). For one (frames, seed) every variant
that keeps the flow's options shares one flow and its samples (the flow checkpoint and the
sample cache are copied from the ``base`` cell, and ``flowforce cg``'s resume logic accepts
them because they were made from the same data and options), so the variants differ only in
what the table says. Variants (:data:`VARIANTS`):

* ``base``: the defaults of ``flowforce cg`` at the sizes of ``bench_cg_data_efficiency``;
* ``internal``: force matching on generalised forces of bonds, angles and torsions, each
  scaled by its RMS (``cg_loss: {kind: internal}``);
* ``jitter``: 30 % extra training points with the periodic torsions turned by N(0, 1 rad)
  (``torsion_jitter``), so the net learns the flow's free energy away from the data;
* ``energy``: the loss also matches the flow's energies −kT log q up to a constant
  (``cg_loss: {energy_weight: 1}``), which fixes free-energy differences directly;
* combinations; ``force-matching`` (mapped all-atom forces, the same net) as the baseline.

Each CG model is judged by MD of the net itself: ``--walkers`` independent Langevin
trajectories (BAOAB, 5 fs, 1/ps, 300 K, bead masses of the mapping) in batched float64 torch,
all started from the first reference frame, ``--md-ps`` ps each, the first 20 ps dropped:
many short runs sample the model's equilibrium far better than one OpenMM run of the same
cost. (``--openmm-ns`` adds one OpenMM run of the exported model, TorchScript on Reference,
as a check that both MD engines agree.) Reported per cell: JS of the φ/ψ surface against the
whole reference (36×36 bins, pseudocount 0.1), P(φ > 0) (reference: 0), the worst CG bond
and angle Wasserstein-1, the CG net's validation losses, and the fraction of walkers that
blew up. Resumable: every cell's files and results.json stay in WORKDIR.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: name → (flow key, options over BASE). Variants with one flow key share a flow.
BASE: dict[str, Any] = {"flow": {"n_layers": 6, "hidden": [64, 64]}, "flow_train": {"steps": 3000},
                        "flow_samples": 30000, "cg_train": {"steps": 3000}}
QUICK: dict[str, Any] = {"flow": {"n_layers": 2, "hidden": [16, 16], "n_components": 4}, "flow_train": {"steps": 20},
                         "flow_samples": 500, "cg_train": {"steps": 20}}
#: The variants spell out every option they use, so the table keeps its meaning when the
#: defaults change (``base`` is flow-matching as it was before issue 15).
def _variant(kind: str = "cartesian", energy: float = 0.0, jitter: float = 0.0, sigma: float = 1.0,
             **more: Any) -> dict[str, Any]:
    return {"cg_loss": {"kind": kind, "energy_weight": energy},
            "torsion_jitter": {"fraction": jitter, "sigma_rad": sigma}, **more}


VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "base": ("flow", _variant()),
    "internal": ("flow", _variant("internal")),
    "internal-torsion3": ("flow", _variant("internal") | {"cg_loss": {"kind": "internal", "energy_weight": 0.0,
                                                                       "weights": {"torsion": 3.0}}}),
    "jitter": ("flow", _variant(jitter=0.3)),
    "jitter+internal": ("flow", _variant("internal", jitter=0.3)),
    "energy": ("flow", _variant(energy=1.0)),
    "jitter+energy": ("flow", _variant(energy=1.0, jitter=0.3)),
    "jitter+internal+energy": ("flow", _variant("internal", energy=1.0, jitter=0.3)),
    "ensemble3": ("ens3", _variant(flow_ensemble=3)),
    "ensemble3+jitter+energy": ("ens3", _variant(energy=1.0, jitter=0.3, flow_ensemble=3)),
    "force-matching": ("none", _variant(force_map="basic")),
    "force-matching+internal": ("none", _variant("internal", force_map="basic")),
    # Is force matching limited by its 3000 optimiser steps rather than by its noisy data?
    "force-matching-long": ("none", _variant(cg_train={"steps": 20000}, force_map="basic")),
    # The least-noise force map (coordinates/force_maps.py): half the torsional force noise.
    "force-matching+optimal-map": ("none", _variant(force_map="optimal")),
    "force-matching+optimal-map+internal": ("none", _variant("internal", force_map="optimal")),
    "jitter-wide": ("flow", _variant(jitter=1.0, sigma=2.0)),
    "jitter-wide+energy": ("flow", _variant(energy=1.0, jitter=1.0, sigma=2.0)),
    # the smooth dihedral features chignolin needs (BENCHMARKS "Chignolin end to end")
    "jitter+energy+weighted": ("flow", _variant(energy=1.0, jitter=0.3, net={"dihedral_features": "weighted"})),
}


def baoab_setup(x: torch.Tensor, masses: np.ndarray, temperature: float, dt_ps: float, friction: float,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """BAOAB constants for walkers at ``x`` ``(W, n, 3)``: masses ``(1, n, 1)``, Maxwell–Boltzmann
    velocities, the O-step's velocity factor ``exp(−γ dt)`` and its noise scale."""
    from openmm_flowforce.conventions import kT

    m = torch.as_tensor(masses, dtype=torch.float64)[None, :, None]
    kt = kT(temperature)
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64) * (kt / m).sqrt()
    c = math.exp(-friction * dt_ps)
    return m, v, c, ((1.0 - c * c) * kt / m).sqrt()


def baoab_step(net: torch.nn.Module, x: torch.Tensor, v: torch.Tensor, f: torch.Tensor, m: torch.Tensor, c: float,
               noise: torch.Tensor, dt_ps: float, gen: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One BAOAB step of all walkers: new ``x, v, f`` and which walkers broke (a non-finite
    coordinate or a bond between consecutive beads longer than 1 nm)."""
    v = v + 0.5 * dt_ps * f / m
    x = x + 0.5 * dt_ps * v
    v = c * v + noise * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    x = x + 0.5 * dt_ps * v
    f = net.energy_and_forces(x)[1].detach()
    v = v + 0.5 * dt_ps * f / m
    bad = ~torch.isfinite(x).all(-1).all(-1) | ((x[:, 1:] - x[:, :-1]).norm(dim=-1) > 1.0).any(-1)
    return x, v, f, bad


def langevin_walkers(net: torch.nn.Module, start: np.ndarray, masses: np.ndarray, temperature: float,
                     walkers: int, steps: int, every: int, dt_ps: float = 0.005, friction: float = 1.0,
                     seed: int = 0) -> tuple[np.ndarray, float]:
    """BAOAB Langevin of ``walkers`` copies of the CG net's molecule, batched in float64 torch.

    Returns the frames ``(walkers·steps/every, n, 3)`` nm of the walkers that stayed finite,
    and the fraction of walkers that did not (a bond longer than 1 nm or a non-finite value).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(start, dtype=torch.float64).expand(walkers, -1, -1).clone()
    m, v, c, noise = baoab_setup(x, masses, temperature, dt_ps, friction, gen)
    _, f = net.energy_and_forces(x)
    frames, alive = [], torch.ones(walkers, dtype=torch.bool)
    for step in range(1, steps + 1):
        x, v, f, bad = baoab_step(net, x, v, f, m, c, noise, dt_ps, gen)
        if bool(bad.any()):
            alive &= ~bad
            x = torch.where(bad[:, None, None], torch.as_tensor(start, dtype=torch.float64), x)
            v = torch.where(bad[:, None, None], torch.zeros_like(v), v)
            _, f = net.energy_and_forces(x)
        if step % every == 0:
            frames.append(x[alive].detach().clone())
    return torch.cat(frames).numpy() if frames else np.zeros((0, *start.shape)), float(1.0 - alive.double().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="alanine dipeptide dataset (flowforce md), e.g. 20 ns")
    parser.add_argument("--frames", type=int, nargs="+", default=[1000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["base", "internal", "jitter", "jitter+internal"],
                        choices=sorted(VARIANTS))
    parser.add_argument("--walkers", type=int, default=64)
    parser.add_argument("--md-ps", type=float, default=100.0, help="ps per walker (5 fs steps)")
    parser.add_argument("--workdir", default="cg_smooth")
    parser.add_argument("--quick", action="store_true", help="tiny models and MD: checks that the script runs")
    parser.add_argument("--collect", nargs="+", metavar="DIR",
                        help="only print the markdown table of the results.json in these workdirs, or of these "
                             "JSON files (runs split over several processes)")
    parser.add_argument("--plot", metavar="PNG", help="with --collect: JS against training frames, mean ± s.d.")
    args = parser.parse_args()
    if args.collect:
        merged: dict[str, Any] = {}
        for path in map(Path, args.collect):
            merged.update(json.loads((path if path.is_file() else path / "results.json").read_text()))
        print_markdown(merged)
        if args.plot:
            print(f"plot: {plot_collected(merged, Path(args.plot))}")
        return
    torch.set_num_threads(1)

    from openmm_flowforce.analysis.bonded import bonds_of_pdb, compare_bonded
    from openmm_flowforce.analysis.fes import PHI_PSI, compare_fes, compute_cvs, parse_cv
    from openmm_flowforce.coordinates.cg_mapping import CGMapping
    from openmm_flowforce.coordinates.force_maps import system_constraints
    from openmm_flowforce.data.dataset import load_dataset
    from openmm_flowforce.potentials.cg_net import load_cg_net
    from openmm_flowforce.safety import deserialize_xml
    from openmm_flowforce.training.flow_matching import coarse_grain

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = load_dataset(args.reference)
    constraints = system_constraints(deserialize_xml(data.system_xml, "system_xml", expected="System")) \
        if data.system_xml else []
    mapping = CGMapping.from_topology(data.topology, "backbone")
    target = np.asarray(mapping.map_positions(data.positions.astype(np.float64)))
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    base = QUICK if args.quick else BASE
    md_steps = 200 if args.quick else int(round(args.md_ps / 0.005))
    every, skip_steps = 20, (0 if args.quick else 4000)

    for n in args.frames:
        stride = max(1, data.n_frames // n)
        subset = slice(0, stride * n, stride)
        for seed in args.seeds:
            for variant in args.variants:
                key = f"{variant} n={n} seed={seed}"
                if key in results:
                    continue
                flow_key, extra = VARIANTS[variant]
                options = {**base, **extra, "seed": seed}
                ckpt = work / f"{variant}_{n}_s{seed}.ckpt"
                shared = work / f"{flow_key}_{n}_s{seed}"
                # The shared flow and its samples; an ensemble's first member is the plain flow.
                first = work / f"flow_{n}_s{seed}.flow.ckpt"
                for mine, theirs in ((ckpt.with_suffix(".flow.ckpt"), shared.with_name(shared.name + ".flow.ckpt")),
                                     (ckpt.with_suffix(".samples.npz"), shared.with_name(shared.name + ".samples.npz")),
                                     (ckpt.with_suffix(".flow.ckpt"), first)):
                    if flow_key != "none" and not mine.exists() and theirs.exists():
                        shutil.copyfile(theirs, mine)
                began = time.perf_counter()
                if not ckpt.exists():
                    method = "force-matching" if variant.startswith("force-matching") else "flow-matching"
                    result = coarse_grain(data.positions[subset], data.topology, data.temperature, ckpt, "backbone",
                                          method, forces=data.forces[subset], options=options, progress=False,
                                          constraints=constraints)
                    info = result.info
                    for suffix in (".flow.ckpt", ".samples.npz"):
                        theirs = shared.with_name(shared.name + suffix)
                        if flow_key != "none" and not theirs.exists() and ckpt.with_suffix(suffix).exists():
                            shutil.copyfile(ckpt.with_suffix(suffix), theirs)
                else:
                    from openmm_flowforce.training.flow_matching import load_cg_model_metadata

                    info = load_cg_model_metadata(ckpt).get("training", {})
                trained = time.perf_counter() - began
                net, _ = load_cg_net(ckpt)
                net = net.double().eval()
                began = time.perf_counter()
                frames, blown = langevin_walkers(net, target[0], mapping.masses, data.temperature,
                                                 args.walkers, md_steps, every, seed=seed)
                frames = frames[args.walkers * (skip_steps // every):]
                md_seconds = time.perf_counter() - began
                phi = compute_cvs(frames, [parse_cv(PHI_PSI[0])])[:, 0] if len(frames) else np.zeros(0)
                row: dict[str, Any] = {"variant": variant, "frames": n, "seed": seed, "blown_walkers": blown,
                                       "train_seconds": trained, "md_seconds": md_seconds}
                if len(frames):
                    js = compare_fes(target, frames, PHI_PSI).divergences
                    bonded = compare_bonded(target, frames, bonds_of_pdb(ckpt.with_suffix(".pdb")))
                    row.update({"js": js["js"], "kl": js["kl"], "p_phi_positive": float((phi > 0).mean()),
                                "worst_bond_w1_pm": 1000 * bonded["bonds_w1_max_nm"],
                                "worst_angle_w1_deg": bonded["angles_w1_max_deg"], "bonded": bonded})
                row.update({k: info.get(k) for k in ("cg_initial_val_loss", "cg_best_val_loss", "flow_best_val_nll",
                                                     "dropped_samples", "training_frames", "torsion_jitter_points")})
                results[key] = row
                results_path.write_text(json.dumps(results, indent=1))
                print(key, json.dumps({k: v for k, v in row.items() if k != "bonded"}), flush=True)
    print_table(results, args.frames, args.variants)


def print_table(results: dict[str, Any], frames: list[int], variants: list[str]) -> None:
    """Mean ± s.d. over seeds of the JS and P(φ > 0) per variant and training-set size."""
    print(f"{'variant':>22} {'frames':>6} {'seeds':>5} {'JS mean ± sd':>16} {'P(phi>0)':>9} {'blown':>6}")
    for n in frames:
        for variant in variants:
            rows = [r for r in results.values() if r["variant"] == variant and r["frames"] == n and "js" in r]
            if not rows:
                continue
            js = np.array([r["js"] for r in rows])
            pos = np.mean([r["p_phi_positive"] for r in rows])
            blown = np.mean([r["blown_walkers"] for r in rows])
            print(f"{variant:>22} {n:>6} {len(rows):>5} {js.mean():>8.3f} ± {js.std(ddof=1) if len(js) > 1 else 0:.3f}"
                  f" {pos:>9.3f} {blown:>6.2f}")


def plot_collected(results: dict[str, Any], path: Path, floor: float = 0.006) -> Path:
    """JS of the CG MD against training frames, one line per variant measured at two or more
    sizes (the others are in the table), error bars = s.d. over seeds; the dashed line is the
    floor of the statistic (two 10 ns halves of the reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results.values() if "js" in r]
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        frames = sorted({r["frames"] for r in rows if r["variant"] == variant})
        if len(frames) < 2:
            continue
        js = [[r["js"] for r in rows if r["variant"] == variant and r["frames"] == n] for n in frames]
        ax.errorbar(frames, [np.mean(v) for v in js], yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in js],
                    marker="o", capsize=3, label=f"{variant} (seeds: {', '.join(str(len(v)) for v in js)})")
    ax.axhline(floor, color="grey", linestyle="--", linewidth=1, label="floor: two 10 ns halves of the reference")
    ax.set(xscale="log", yscale="log", xlabel="training frames (of a 20 ns reference)",
           ylabel="JS of the CG MD's φ/ψ surface (nats)", title="alanine dipeptide, backbone CG: data efficiency")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def print_markdown(results: dict[str, Any]) -> None:
    """One row per (frames, variant): JS per seed, mean ± s.d., P(φ > 0), worst bond/angle W1."""
    print("| frames | variant | JS per seed | JS mean ± s.d. | P(φ > 0) | worst bond W1 (pm) | worst angle W1 (°) "
          "| CG val. loss start → best |")
    print("|---:|---|---|---:|---:|---:|---:|---|")
    rows = [r for r in results.values() if "js" in r]
    for n in sorted({r["frames"] for r in rows}):
        for variant in dict.fromkeys(r["variant"] for r in rows if r["frames"] == n):
            cell = sorted((r for r in rows if r["frames"] == n and r["variant"] == variant), key=lambda r: r["seed"])
            js = np.array([r["js"] for r in cell])
            spread = f" ± {js.std(ddof=1):.3f}" if len(js) > 1 else ""
            losses = "; ".join(f"{r['cg_initial_val_loss']:.3f} → {r['cg_best_val_loss']:.3f}" for r in cell)
            print(f"| {n} | {variant} | {', '.join(f'{v:.3f}' for v in js)} | {js.mean():.3f}{spread} "
                  f"| {np.mean([r['p_phi_positive'] for r in cell]):.4f} "
                  f"| {np.mean([r['worst_bond_w1_pm'] for r in cell]):.2f} "
                  f"| {np.mean([r['worst_angle_w1_deg'] for r in cell]):.2f} | {losses} |")


if __name__ == "__main__":
    main()
