"""Is a flow potential smooth enough for MD? NLL-only vs NLL + force matching.

    python bench/bench_flow_md_stability.py [--steps 600] [--frames 5000]

Reference: Langevin MD of the built-in alanine dipeptide (amber14, vacuum, 300 K, a frame
every 50 fs). Two Boltzmann generators (4 layers, hidden 64, K = 8, float64) are trained
on the same 90% of the frames, one by NLL alone and one by NLL + 0.1·force matching.
For each, and for Amber: the shortest vibrational period at 10 held-out frames (from the
mass-weighted Hessian of the potential) and velocity-Verlet energy conservation from a
held-out frame (max |E − E₀| and the drift between the first and last tenth, kJ/mol, over
0.5 ps) at 0.25, 0.5 and 1 fs.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def _verlet(energy_forces, x0: np.ndarray, masses: np.ndarray, dt: float, steps: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    kt = 0.0083144626 * 300.0
    v = rng.normal(size=x0.shape) * np.sqrt(kt / masses)
    x = x0.copy()
    e, f = energy_forces(x)
    total = []
    for _ in range(steps):
        v += 0.5 * dt * f / masses
        x += dt * v
        e, f = energy_forces(x)
        v += 0.5 * dt * f / masses
        total.append(e + 0.5 * float((masses * v * v).sum()))
    total = np.array(total)
    q = max(1, len(total) // 10)
    return float(np.abs(total - total[0]).max()), float(total[-q:].mean() - total[:q].mean())


def _shortest_period_fs(energy_forces, x: np.ndarray, masses: np.ndarray, h: float = 1e-5) -> float:
    n = x.size
    hess = np.zeros((n, n))
    for i in range(n):
        step = np.zeros(n)
        step[i] = h
        fp = energy_forces(x + step.reshape(x.shape))[1].ravel()
        fm = energy_forces(x - step.reshape(x.shape))[1].ravel()
        hess[i] = -(fp - fm) / (2 * h)
    m = np.repeat(masses.ravel(), 3)  # one mass per Cartesian coordinate
    weighted = 0.5 * (hess + hess.T) / np.sqrt(np.outer(m, m))
    omega = np.sqrt(np.clip(np.linalg.eigvalsh(weighted).max(), 1e-12, None))  # 1/ps
    return float(2 * np.pi / omega * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="training steps per model")
    parser.add_argument("--frames", type=int, default=5000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)

    import openmm
    from openmm import unit

    from openmm_flowforce.conventions import kT
    from openmm_flowforce.md.reference import run_reference_md
    from openmm_flowforce.md.systems import load_system
    from openmm_flowforce.potentials import BoltzmannGenerator
    from openmm_flowforce.training import TrainConfig, Trainer

    topology, system, positions = load_system(system="alanine-dipeptide")
    md = run_reference_md(topology, system, positions, time_ns=args.frames * 5e-5, save_every_ps=0.05,
                          platform="Reference", progress=False, seed=1)
    x_all, f_all = md["positions"].astype(np.float64), md["forces"].astype(np.float64)
    n_train = int(0.9 * len(x_all))
    masses = np.array([system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(system.getNumParticles())])[:, None]
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))

    def amber(x):
        context.setPositions(x)
        state = context.getState(getEnergy=True, getForces=True)
        return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
                state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))

    def flow(model):
        def energy_forces(x):
            xt = torch.as_tensor(x)[None].requires_grad_(True)
            e = model.energy(xt, 300.0).sum()
            (g,) = torch.autograd.grad(e, xt)
            return float(e), -g[0].numpy()
        return energy_forces

    potentials = {"amber14": amber}
    rows = {}
    for name, loss in (("flow, nll", {"nll": 1.0}), ("flow, nll + 0.1 force", {"nll": 1.0, "force": 0.1})):
        torch.manual_seed(0)
        bg = BoltzmannGenerator.from_topology(topology, x_all[:n_train], n_layers=4, hidden=64, n_components=8)
        start = time.perf_counter()
        trainer = Trainer(bg, loss, data={"x": torch.as_tensor(x_all[:n_train]),
                                          "forces": torch.as_tensor(f_all[:n_train]) / kT(300.0)},
                          val_data={"x": torch.as_tensor(x_all[n_train:])},
                          config=TrainConfig(steps=args.steps, batch_size=128, lr=2e-3, validate_every=100))
        trainer.run()
        bg.eval()
        potentials[name] = flow(bg)
        rows[name] = {"val_nll": trainer.best_val, "train_s": time.perf_counter() - start}
    held_out = x_all[n_train:]
    for name, ef in potentials.items():
        row = rows.setdefault(name, {})
        row["shortest_period_fs"] = min(_shortest_period_fs(ef, held_out[i], masses)
                                        for i in range(0, len(held_out), max(1, len(held_out) // 10)))
        for dt_fs in (0.25, 0.5, 1.0):
            steps = int(round(500 / dt_fs))
            row[f"nve_{dt_fs}fs"] = _verlet(ef, held_out[-1].copy(), masses, dt_fs / 1000, steps, seed=3)
        print(name, json.dumps(row), flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
