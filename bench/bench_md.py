"""MD speed on alanine dipeptide: Amber vs learned potentials through every force backend, in one run.

    python bench/bench_md.py [--steps 4000] [--platforms Reference CPU] [--torch-threads 1] \
        [--json bench/results/bench_md.json]

Rows (Langevin 1 fs, 300 K, steps/s after warm-up; ns/day at that step):
* all-atom amber14 in vacuum and with OBC2 implicit solvent (22 atoms);
* the floors: a TorchForce and a PythonForce whose model is E = Σ|r|²;
* the CG net of the 5-bead backbone mapping (`flowforce cg` default architecture, priors fitted
  to MD frames) through TorchForce (TorchScript returning energy and forces), PythonForce
  running the AOTInductor package, and the native plugin running the same package;
* the flow potential U = −kT log q of a Boltzmann generator with the `flowforce train` default
  architecture (normalisation fitted to MD frames, so both torsion branches run) through the
  same three backends.
Packages are float32 (`compile_package` default); compiling them takes minutes and is not timed.
Speed does not depend on training, so the models are not trained. Times swing on a shared
machine: the ratios within one run are what to read.
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


def _trivial_python(state):
    x = state.getPositions(asNumpy=True)._value
    return float((x * x).sum()), -2.0 * x


def _steps_per_second(system, positions, platform: str, steps: int, timestep_ps: float = 0.001) -> float:
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, timestep_ps * unit.picosecond)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform))
    context.setPositions(positions)
    integrator.step(max(20, steps // 20))
    context.getState(getEnergy=True)
    start = time.perf_counter()
    integrator.step(steps)
    context.getState(getEnergy=True)  # make sure the work is done
    return steps / (time.perf_counter() - start)


def _md_frames(pdb, n_frames: int = 1000) -> np.ndarray:
    """Vacuum amber14 frames (nm) every 20 fs after minimisation: what the models are fitted to."""
    system = app.ForceField("amber14-all.xml").createSystem(pdb.topology, nonbondedMethod=app.NoCutoff)
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 5 / unit.picosecond, 0.001 * unit.picosecond)
    integrator.setRandomNumberSeed(1)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(pdb.positions)
    openmm.LocalEnergyMinimizer.minimize(context)
    frames = []
    for _ in range(n_frames):
        integrator.step(20)
        frames.append(context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    return np.asarray(frames)


def _system(masses, force) -> openmm.System:
    system = openmm.System()
    for mass in masses:
        system.addParticle(float(mass))
    system.addForce(force)
    return system


def write_results(path, meta: dict, rows: list) -> None:
    """Print ``meta`` as JSON and, when ``path`` is given, write ``{"meta", "rows"}`` there."""
    print(json.dumps(meta))
    if path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4000, help="timed steps of the fast rows (flow rows: 1/10)")
    parser.add_argument("--platforms", nargs="+", default=["Reference", "CPU"])
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--package-device", choices=["cpu", "cuda"], default="cpu",
                        help="device the .pt2 packages are compiled for (cuda: on the machine with the GPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)

    from openmm_flowforce.coordinates.cg_mapping import CGMapping
    from openmm_flowforce.data import alanine_dipeptide_pdb
    from openmm_flowforce.export.backends import make_force
    from openmm_flowforce.export.compiled import compile_package
    from openmm_flowforce.export.native import native_unavailable
    from openmm_flowforce.export.torchscript import export_potential
    from openmm_flowforce.potentials import BoltzmannGenerator
    from openmm_flowforce.potentials.cg_net import CGEnergyNet
    from openmm_flowforce.training.boltzmann import FLOW_DEFAULTS

    pdb = app.PDBFile(alanine_dipeptide_pdb())
    positions = pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    atom_masses = [atom.element.mass.value_in_unit(unit.dalton) for atom in pdb.topology.atoms()]
    forcefields = {"amber14 vacuum (22 atoms)": ["amber14-all.xml"],
                   "amber14 OBC2 implicit (22 atoms)": ["amber14-all.xml", "implicit/obc2.xml"]}
    systems = {name: (app.ForceField(*files).createSystem(pdb.topology, nonbondedMethod=app.NoCutoff), positions)
               for name, files in forcefields.items()}
    frames = _md_frames(pdb)
    backends = ["torchforce", "pythonforce"] + (["native"] if native_unavailable() is None else [])
    if "native" not in backends:
        print(f"native plugin unavailable: {native_unavailable()}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        import openmmtorch

        trivial = tmp / "trivial.pt"
        torch.jit.script(_Trivial()).save(str(trivial))
        systems["floor: trivial TorchForce Σ|r|²"] = (_system(atom_masses, openmmtorch.TorchForce(str(trivial))),
                                                      positions)
        floor_python = openmm.PythonForce(_trivial_python)
        systems["floor: trivial PythonForce Σ|r|²"] = (_system(atom_masses, floor_python), positions)

        print("building and compiling the CG net and the flow potential (minutes) ...", flush=True)
        mapping = CGMapping.from_topology(pdb.topology, "backbone")
        beads = mapping.map_positions(frames)
        torch.manual_seed(0)
        net = CGEnergyNet.from_data(mapping, beads, 300.0, hidden=(64, 64)).double().eval()
        cg_model = (net, mapping, mapping.pdb_text(beads[0]))
        cg_pt = export_potential(cg_model, tmp / "cg.pt")
        cg_pt2 = compile_package(cg_model, tmp / "cg.pt2", device=args.package_device)
        bg = BoltzmannGenerator.from_topology(pdb.topology, frames, **FLOW_DEFAULTS)
        flow_pt = export_potential(bg, tmp / "flow.pt")
        flow_pt2 = compile_package(bg, tmp / "flow.pt2", device=args.package_device)
        for label, pt, pt2, masses, start in (("CG net (5 beads)", cg_pt, cg_pt2, mapping.masses, beads[0]),
                                              ("flow potential (22 atoms)", flow_pt, flow_pt2, atom_masses, frames[0])):
            for backend in backends:
                source = pt if backend == "torchforce" else pt2
                systems[f"{label}: {backend}"] = (_system(masses, make_force(source, backend=backend)), start)

        rows = []
        for name, (system, start) in systems.items():
            for plat in args.platforms:
                steps = args.steps if "flow potential" not in name else max(200, args.steps // 10)
                rate = _steps_per_second(system, start, plat, steps)
                rows.append({"system": name, "platform": plat, "steps_per_s": rate,
                             "us_per_step": 1e6 / rate, "ns_per_day_1fs": rate * 0.0864, "steps": steps})
                print(f"{name:<42} {plat:<10} {rate:>10.0f} steps/s {1e6 / rate:>9.1f} µs/step", flush=True)
    meta = {"torch": torch.__version__, "openmm": openmm.__version__, "machine": host.machine(),
            "torch_threads": args.torch_threads, "package_device": args.package_device}
    write_results(args.json, meta, rows)


if __name__ == "__main__":
    main()
