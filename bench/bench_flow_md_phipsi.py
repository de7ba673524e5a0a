"""Does MD with a flow potential stay in the reference φ/ψ basins? All-atom alanine dipeptide.

    python bench/bench_flow_md_phipsi.py [--ref-ns 2] [--train-steps 1500] [--md-steps 20000] [--workdir DIR]

Reference MD (amber14, vacuum, 300 K, a frame per ps) → Boltzmann generator trained by
NLL + 0.001·force matching (4 layers, hidden 64, K = 8) → exported → Langevin MD in OpenMM
through TorchForce (0.5 fs, 300 K, from the built-in structure) → φ/ψ histograms (36×36
bins, pseudocount 0.1) of the flow MD and of the flow's own samples against the reference:
KL and Jensen–Shannon divergences (nats), plus the basin populations (β/C7eq: φ < 0,
ψ > 50°; αR: φ < 0, −120° < ψ ≤ 50°; αL/C7ax: φ > 0). The flow MD is short, so read its
numbers as "stays in the right basins", not as converged populations.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

PHI, PSI = "dihedral:4,6,8,14", "dihedral:6,8,14,16"


def _basins(phi_psi: np.ndarray) -> dict[str, float]:
    phi, psi = phi_psi[:, 0], phi_psi[:, 1]
    beta = (phi < 0) & (psi > 50)
    alpha_r = (phi < 0) & (psi <= 50) & (psi > -120)
    return {"beta_c7eq": float(beta.mean()), "alpha_r": float(alpha_r.mean()), "phi_positive": float((phi > 0).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref-ns", type=float, default=2.0)
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--md-steps", type=int, default=20000)
    parser.add_argument("--workdir", default="phipsi_run")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from openmm_flowforce.analysis.fes import compare_fes, compute_cvs, load_trajectory_positions, parse_cv
    from openmm_flowforce.data import alanine_dipeptide_pdb
    from openmm_flowforce.export.torchscript import export_potential
    from openmm_flowforce.md.reference import run_reference_md
    from openmm_flowforce.md.simulate import simulate
    from openmm_flowforce.md.systems import load_system
    from openmm_flowforce.training import TrainConfig
    from openmm_flowforce.training.boltzmann import train_boltzmann_generator

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    timings = {}
    start = time.perf_counter()
    topology, system, positions = load_system(system="alanine-dipeptide")
    md = run_reference_md(topology, system, positions, time_ns=args.ref_ns, save_every_ps=1.0, platform="Reference",
                          progress=False, seed=2)
    timings["reference_md_s"] = time.perf_counter() - start

    start = time.perf_counter()
    model, trainer = train_boltzmann_generator(
        topology, md["positions"], work / "bg.ckpt", forces_kj_mol_nm=md["forces"], temperature=300.0,
        weights={"nll": 1.0, "force": 0.001}, flow={"n_layers": 4, "hidden": [64, 64], "n_components": 8},
        config=TrainConfig(steps=args.train_steps, batch_size=128, lr=2e-3, validate_every=100), progress=False)
    timings["train_s"] = time.perf_counter() - start
    with torch.no_grad():
        samples = model.sample(5000).double().numpy()

    pt = export_potential(work / "bg.ckpt", work / "bg.pt")
    start = time.perf_counter()
    result = simulate(pt, alanine_dipeptide_pdb(), args.md_steps, work / "flow_md.dcd", platform="Reference",
                      timestep_fs=0.5, backend="torchforce", report_interval=100, progress=False)
    timings["flow_md_s"] = time.perf_counter() - start
    flow_md = load_trajectory_positions(work / "flow_md.dcd", alanine_dipeptide_pdb(), skip=10)

    cvs = [parse_cv(PHI), parse_cv(PSI)]
    report = {"reference_frames": int(len(md["positions"])), "flow_md_frames": int(len(flow_md)),
              "best_val_nll": trainer.best_val, "timings": timings,
              "basins": {name: _basins(compute_cvs(x, cvs)) for name, x in
                         (("reference", md["positions"]), ("flow samples", samples), ("flow MD", flow_md))}}
    for name, x in (("flow samples", samples), ("flow MD", flow_md)):
        report[f"divergences vs reference: {name}"] = compare_fes(md["positions"], x, cvs).divergences
    print(json.dumps(report, indent=2))
    (work / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
