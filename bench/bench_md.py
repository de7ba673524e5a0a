"""MD speed on alanine dipeptide: Amber vs the exported flow potential vs a trivial TorchForce.

    python bench/bench_md.py [--steps 2000] [--platforms Reference CPU] [--torch-threads 1]

Rows, in one run: (a) Amber14 in vacuum and with OBC2 implicit solvent, (b) the flow
potential of an (untrained) Boltzmann generator with the `flowforce train` default
architecture, exported to TorchScript and run through TorchForce and through
PythonForce, (c) a TorchForce whose model is E = Σ|r|² (the floor of the TorchForce
path). Langevin 1 fs at 300 K from the built-in structure; steps/s after 100 warm-up
steps. Speed does not depend on training, so the model is not trained.
"""
from __future__ import annotations

import argparse
import json
import platform as host
import tempfile
import time
from pathlib import Path

import numpy as np
import openmm
import torch
from openmm import app, unit


class _Trivial(torch.nn.Module):
    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return (positions ** 2).sum()


def _steps_per_second(system, positions, platform: str, steps: int) -> float:
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 0.001 * unit.picosecond)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform))
    context.setPositions(positions)
    integrator.step(100)
    context.getState(getEnergy=True)
    start = time.perf_counter()
    integrator.step(steps)
    context.getState(getEnergy=True)  # make sure the work is done
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--platforms", nargs="+", default=["Reference", "CPU"])
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)

    from openmm_flowforce.data import alanine_dipeptide_pdb
    from openmm_flowforce.export.torchscript import export_potential
    from openmm_flowforce.openmm import create_system
    from openmm_flowforce.potentials import BoltzmannGenerator
    from openmm_flowforce.training.boltzmann import FLOW_DEFAULTS

    pdb = app.PDBFile(alanine_dipeptide_pdb())
    positions = pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    forcefields = {"amber14 vacuum": ["amber14-all.xml"], "amber14 OBC2": ["amber14-all.xml", "implicit/obc2.xml"]}
    systems = {name: app.ForceField(*files).createSystem(pdb.topology, nonbondedMethod=app.NoCutoff)
               for name, files in forcefields.items()}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        frames = np.asarray(positions)[None] + 0.003 * np.random.default_rng(0).normal(size=(64, 22, 3))
        bg = BoltzmannGenerator.from_topology(pdb.topology, frames, **FLOW_DEFAULTS)
        model_pt = export_potential(bg, Path(tmp) / "flow.pt")
        for backend in ("torchforce", "pythonforce"):
            systems[f"flow potential ({backend})"] = create_system(pdb.topology, model_pt, backend=backend)
        trivial = Path(tmp) / "trivial.pt"
        torch.jit.script(_Trivial()).save(str(trivial))
        import openmmtorch
        floor = openmm.System()
        for atom in pdb.topology.atoms():
            floor.addParticle(atom.element.mass)
        floor.addForce(openmmtorch.TorchForce(str(trivial)))
        systems["trivial TorchForce Σ|r|² (floor)"] = floor

        rows = []
        for name, system in systems.items():
            for plat in args.platforms:
                steps = args.steps if "flow" not in name else max(200, args.steps // 10)
                rate = _steps_per_second(system, positions, plat, steps)
                rows.append({"system": name, "platform": plat, "steps_per_s": rate,
                             "ns_per_day": rate * 86400 * 1e-6, "steps": steps})
                print(f"{name:<36} {plat:<10} {rate:>10.0f} steps/s  {rate * 0.0864:>8.2f} ns/day", flush=True)
    print(f"torch {torch.__version__}, openmm {openmm.__version__}, {host.machine()}, "
          f"torch threads {args.torch_threads}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
