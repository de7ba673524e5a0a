"""Why flow-matching on chignolin gave CG MD that blows up, and which options fix it (issue 14):
CG nets trained from one flow and its samples with different ``flowforce cg`` options, each run
as batched Langevin walkers.

    python bench/bench_chignolin.py --workdir chig --methods flow-matching --net mlp   # the flow
    python bench/bench_chignolin_fm.py --reference chig/ref.npz --flow chig/flow-matching \\
        --workdir chig_fm --variants defaults priors-only no-jitter weighted weighted+contacts

Every variant starts from the same flow (``FLOW/cg.flow.ckpt``) and its sample cache
(``FLOW/cg.samples.npz``), copied into its folder, so they differ only in what :data:`VARIANTS`
says. Each CG net (the MLP, which ``--net auto`` picks for 10 beads; ``flowforce cg`` defaults
otherwise) is then judged by ``--walkers`` independent Langevin walkers (BAOAB, 5 fs, 1/ps,
340 K, the Cα masses; float64 torch, the integrator of ``flowforce simulate``), started from data frames spread over the whole
reference, ``--steps`` steps each, the first 20 % dropped. Reported: the fraction of walkers
that blew up (a bond over 1 nm or a non-finite value; the walker restarts, the fraction counts
it), their kinetic temperature (an integrator heated by stiff forces runs hot), the median
radius of gyration and the median closest non-bonded (≥ 3 bonds) Cα distance against the
reference's, and the CG net's validation loss. Resumable: the CG nets and results.json stay
in WORKDIR.
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

WEIGHTED = {"net": {"dihedral_features": "weighted"}}
#: name → ``flowforce cg`` options over the defaults (MLP net).
VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "priors-only": {"cg_train": {"steps": 1, "lr": 1e-12}},
    "no-jitter": {"torsion_jitter": {"fraction": 0.0}},
    "no-energy": {"cg_loss": {"energy_weight": 0.0}},
    "no-jitter+huber": {"torsion_jitter": {"fraction": 0.0}, "cg_loss": {"huber": 1.0}},
    "strict-priors": {"prior_outlier_factor": 1.0},
    "weighted": WEIGHTED,
    "weighted+no-jitter": {**WEIGHTED, "torsion_jitter": {"fraction": 0.0}},
    "weighted+strict-priors": {**WEIGHTED, "prior_outlier_factor": 1.0},
    "weighted+contacts": {**WEIGHTED, "contact_factor": 1.0},
    "weighted+contacts0.9": {**WEIGHTED, "contact_factor": 0.9},
    # another seed: the CG net's initial weights and batches, the turned torsions, new flow samples
    "weighted+contacts+seed1": {**WEIGHTED, "contact_factor": 1.0, "seed": 1},
}


def shape_of(frames: np.ndarray) -> tuple[float, float]:
    """Median radius of gyration and median closest non-bonded (≥ 3 bonds) distance, nm, of a chain."""
    n = frames.shape[1]
    rg = np.sqrt(((frames - frames.mean(1, keepdims=True)) ** 2).sum(-1).mean(-1))
    i, j = np.triu_indices(n, 3)
    closest = np.linalg.norm(frames[:, i] - frames[:, j], axis=-1).min(1)
    return float(np.median(rg)), float(np.median(closest))


def walkers(net: torch.nn.Module, starts: np.ndarray, masses: np.ndarray, temperature: float, steps: int,
            dt_ps: float = 0.005, friction: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """BAOAB walkers from ``starts`` ``(W, n, 3)``: blow-up fraction, temperature, shape."""
    from bench_cg_smooth import baoab_setup, baoab_step  # bench/ is on sys.path when this script runs

    from openmm_flowforce.conventions import kT

    gen = torch.Generator().manual_seed(seed)
    begin = torch.as_tensor(starts, dtype=torch.float64)
    x = begin.clone()
    m, v, c, noise = baoab_setup(x, masses, temperature, dt_ps, friction, gen)
    kt = kT(temperature)
    _, f = net.energy_and_forces(x)
    f = f.detach()
    alive = torch.ones(len(x), dtype=torch.bool)
    frames, temperatures = [], []
    dof = 3 * x.shape[1] - 3
    for step in range(1, steps + 1):
        x, v, f, bad = baoab_step(net, x, v, f, m, c, noise, dt_ps, gen)
        alive &= ~bad
        x, v, f = (torch.where(bad[:, None, None], a, b) for a, b in ((begin, x), (torch.zeros_like(v), v),
                                                                        (torch.zeros_like(f), f)))
        if step % 100 == 0 and step > steps // 5 and bool(alive.any()):
            frames.append(x[alive].numpy().copy())
            kinetic = 0.5 * (m * v * v).sum((1, 2))[alive]
            temperatures.append(float((2.0 * kinetic / (dof * kt / temperature)).mean()))
    rg, closest = shape_of(np.concatenate(frames)) if frames else (math.nan, math.nan)
    return {"blown_walkers": float(1.0 - alive.double().mean()), "temperature_k": float(np.mean(temperatures)),
            "rg_nm": rg, "closest_nonbonded_nm": closest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="the chignolin dataset (bench_chignolin.py's ref.npz)")
    parser.add_argument("--flow", required=True, help="folder with cg.flow.ckpt and cg.samples.npz of flowforce cg")
    parser.add_argument("--workdir", default="chig_fm")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--walkers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10000, help="5 fs steps per walker")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from openmm_flowforce.coordinates.cg_mapping import CGMapping
    from openmm_flowforce.data.dataset import load_dataset
    from openmm_flowforce.training.flow_matching import coarse_grain

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = load_dataset(args.reference)
    mapping = CGMapping.from_topology(data.topology, "ca")
    beads = np.asarray(mapping.map_positions(data.positions.astype(np.float64)))
    starts = beads[np.linspace(0, len(beads) - 1, args.walkers).astype(int)]
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    rg, closest = shape_of(beads)
    results["reference"] = {"rg_nm": rg, "closest_nonbonded_nm": closest, "frames": len(beads)}
    for variant in args.variants:
        if variant in results:
            continue
        folder = work / variant
        folder.mkdir(exist_ok=True)
        for suffix in (".flow.ckpt", ".samples.npz"):
            if not (folder / f"cg{suffix}").exists():
                shutil.copyfile(Path(args.flow) / f"cg{suffix}", folder / f"cg{suffix}")
        began = time.perf_counter()
        result = coarse_grain(data.positions, data.topology, data.temperature, folder / "cg.ckpt", mapping=mapping,
                              options=VARIANTS[variant], progress=False)
        trained = time.perf_counter() - began
        row = walkers(result.net.double().eval(), starts, mapping.masses, data.temperature, args.steps)
        info = result.info
        row.update(variant=variant, options=VARIANTS[variant], train_seconds=trained,
                   **{k: info.get(k) for k in ("cg_initial_val_loss", "cg_best_val_loss", "dropped_samples",
                                               "dropped_by_priors", "dropped_by_contacts", "training_frames")})
        results[variant] = row
        results_path.write_text(json.dumps(results, indent=1))
        print(json.dumps(row), flush=True)
    print(f"reference: Rg {rg:.3f} nm, closest non-bonded {closest:.3f} nm")
    print("| variant | blown walkers | T (K) | Rg (nm) | closest non-bonded (nm) | dropped samples | CG val. loss |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for variant in args.variants:
        r = results[variant]
        print(f"| {variant} | {r['blown_walkers']:.2f} | {r['temperature_k']:.0f} | {r['rg_nm']:.3f} | "
              f"{r['closest_nonbonded_nm']:.3f} | {r['dropped_samples']} | "
              f"{r['cg_initial_val_loss']:.3g} → {r['cg_best_val_loss']:.3g} |")


if __name__ == "__main__":
    main()
