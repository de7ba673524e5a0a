"""Export for speed (issue 9 §1, §3): per-evaluation cost of energy + forces by every route,
batched per-configuration cost, and the float32 error of the compiled potentials.

    python bench/bench_compiled.py [--workdir DIR] [--repeats 7] [--threads 1]
                                   [--only precision single batched]

Models: the default Boltzmann generator of alanine dipeptide (`flowforce train` architecture:
8 smooth coupling layers, hidden (128, 128), 8 components), its coordinates fitted to 500
frames of Reference MD at 300 K (20 fs apart) and then trained for 300 Adam steps of NLL on
400 of them; and a 5-bead backbone CG net (hidden (64, 64), bond/angle/repulsion/dihedral
priors fitted to the same frames, random last layer). Speed does not depend on training; the
error does (a trained density is sharper), hence the short training.

Rows (one configuration, kJ/mol and kJ/mol/nm, CPU):
* eager float64: the model's own energy + autograd, what PythonForce ran before;
* TorchScript, energy only: the module of the previous export (energy; autograd outside);
* TorchScript with forces: the module written now (returns (energy, forces));
* AOTI package float32 / float64, called from Python;
* OpenMM Reference steps: TorchForce (energy-only file; file with forces and
  setOutputsForces(True)) and PythonForce calling the float32 package.
Batched (positions (B, N, 3)): eager float64, torch.compile (dynamic shapes) of the same
batched energy+forces graph the package is built from, and the batched AOTI package (its
runner), per configuration at B = 1, 64, 1024 (B = 1 is compiled separately by
torch.compile, outside the timed calls).

Times are medians over --repeats rounds in which the methods are interleaved (the machine is
shared; absolute times swing by ±50 %). Packages are compiled once into --workdir and
reused (delete them after changing the model code).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)


# -- models --------------------------------------------------------------------------------------
def md_frames(n_frames: int = 500) -> tuple[Any, np.ndarray]:
    import openmm
    from openmm import app, unit

    from openmm_flowforce.data import alanine_dipeptide_pdb

    pdb = app.PDBFile(alanine_dipeptide_pdb())
    system = app.ForceField("amber14-all.xml").createSystem(pdb.topology, nonbondedMethod=app.NoCutoff,
                                                            constraints=None)
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 5 / unit.picosecond, 0.001 * unit.picosecond)
    integrator.setRandomNumberSeed(7)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(pdb.positions)
    openmm.LocalEnergyMinimizer.minimize(context)
    context.setVelocitiesToTemperature(300 * unit.kelvin, 7)
    integrator.step(1000)
    frames = []
    for _ in range(n_frames):
        integrator.step(20)
        frames.append(context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    return pdb.topology, np.array(frames)


def build_flow(topology, frames: np.ndarray, train_steps: int, path: Path):
    from openmm_flowforce.potentials import BoltzmannGenerator
    from openmm_flowforce.training.boltzmann import FLOW_DEFAULTS

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    try:
        model = BoltzmannGenerator.from_topology(topology, frames[:400], **FLOW_DEFAULTS)
    finally:
        torch.set_default_dtype(old)
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    work = copy.deepcopy(model).float()
    optimiser = torch.optim.Adam(work.parameters(), 1e-3)
    x = torch.as_tensor(frames[:400], dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    for _ in range(train_steps):
        loss = -work.log_prob(x[torch.randint(0, 400, (128,), generator=generator)]).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.load_state_dict({k: v.to(torch.float64) if v.is_floating_point() else v
                           for k, v in work.state_dict().items()})
    torch.save(model.state_dict(), path)
    return model.eval()


def build_cg(topology, frames: np.ndarray):
    from openmm_flowforce.coordinates.cg_mapping import CGMapping
    from openmm_flowforce.potentials.cg_net import CGEnergyNet

    mapping = CGMapping.from_topology(topology, "backbone")
    beads = mapping.map_positions(frames)
    torch.manual_seed(0)
    net = CGEnergyNet.from_data(mapping, beads[:400], 300.0, hidden=(64, 64),
                                priors={"bonds": {}, "angles": {}, "repulsion": {}, "dihedrals": {"n_terms": 3}})
    net = net.double()
    torch.nn.init.normal_(net.network[-1].weight, std=0.5)
    return (net.eval(), mapping, mapping.pdb_text(beads[0])), beads


# -- precision ---------------------------------------------------------------------------------------
def _energy_and_forces(fn: Callable, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    energy = fn(x)
    (grad,) = torch.autograd.grad(energy.sum(), x)
    return energy.detach().double(), -grad.double()


def precision_rows(name: str, variants: dict[str, Callable], x32: torch.Tensor, reference: Callable) -> list[dict]:
    """Error of each variant (called with float32 positions) against float64 eager on the same positions."""
    want_e, want_f = _energy_and_forces(reference, x32.double())
    fmax = want_f.abs().amax((1, 2))
    rows = []
    for label, fn in variants.items():
        e, f = fn(x32)
        de = (e.double() - want_e).abs()
        df = (f.double() - want_f).abs().amax((1, 2)) / fmax
        rows.append({"model": name, "variant": label, "dU_median": float(de.median()), "dU_max": float(de.max()),
                     "dF_rel_median": float(df.median()), "dF_rel_max": float(df.max()),
                     "U_median": float(want_e.abs().median()), "Fmax_median": float(fmax.median())})
    return rows


# -- timing ------------------------------------------------------------------------------------------
def interleaved(methods: dict[str, Callable[[], Any]], repeats: int, min_time: float = 0.3) -> dict[str, float]:
    """Median seconds per call of each method, the methods interleaved in every round."""
    counts = {}
    for name, fn in methods.items():  # warm up and choose a call count per round
        fn()
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < min_time / 3:
            fn()
            n += 1
        counts[name] = max(1, n * 3 // 2)
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            for _ in range(counts[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / counts[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def _steps(system, positions: np.ndarray, n_steps: int) -> Callable[[], None]:
    import openmm
    from openmm import unit

    integrator = openmm.VerletIntegrator(0.0005 * unit.picosecond)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions * unit.nanometer)

    def run() -> None:
        context.setPositions(positions * unit.nanometer)  # keep every round at the same structure
        integrator.step(n_steps)

    return run


def _system(force, masses) -> Any:
    import openmm

    system = openmm.System()
    for m in masses:
        system.addParticle(m)
    system.addForce(force)
    return system


def energy_only_torchscript(exported: Path, path: Path) -> Path:
    """A TorchScript file like those written before forces moved into the module: the same
    core as ``exported`` (traced flow, scripted CG net), returning the energy only."""
    from openmm_flowforce.export.torchscript import _quiet_jit, load_exported, read_export_metadata, save_exported

    class EnergyOnly(torch.nn.Module):
        def __init__(self, core: torch.nn.Module):
            super().__init__()
            self.core = core

        def forward(self, positions: torch.Tensor) -> torch.Tensor:
            return self.core(positions.to(torch.float64).unsqueeze(0)).reshape(()).to(positions.dtype)

    metadata = read_export_metadata(exported)
    topology_pdb = metadata.pop("topology_pdb")
    metadata.pop("outputs")
    with _quiet_jit():
        module = torch.jit.script(EnergyOnly(load_exported(exported).module.core))
    return save_exported(module, metadata, topology_pdb, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("bench_compiled_work"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 1024])
    parser.add_argument("--only", nargs="+", choices=["precision", "single", "batched"],
                        default=["precision", "single", "batched"], help="sections to run (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)

    from openmm_flowforce.export.compiled import compile_package, load_package, trace_batch_size
    from openmm_flowforce.export.graph import EnergyAndForces, trace_energy_and_forces
    from openmm_flowforce.export.models import CGEnergy, FlowEnergy, energy_module, resolve_exportable
    from openmm_flowforce.export.torchscript import export_potential, load_exported

    topology, frames = md_frames()
    flow = build_flow(topology, frames, args.train_steps, args.workdir / "flow_state.pt")
    cg, beads = build_cg(topology, frames)
    net = cg[0]
    results: dict[str, Any] = {"threads": args.threads, "torch": torch.__version__, "precision": []}

    x32 = torch.as_tensor(frames[400:], dtype=torch.float32)  # 100 held-out frames
    b32 = torch.as_tensor(beads[400:], dtype=torch.float32)
    if "precision" in args.only:
        # Precision: float32 positions for every variant.
        flow32 = copy.deepcopy(flow).float()
        net32 = copy.deepcopy(net).float()
        rows = precision_rows("flow", {
            "all float32": lambda x: _energy_and_forces(lambda y: flow32.energy(y, 300.0), x),
            "float64 geometry, float32 flow": lambda x: _energy_and_forces(FlowEnergy(flow, 300.0, torch.float32), x),
            "float64, output rounded to float32": lambda x: tuple(
                t.float() for t in _energy_and_forces(lambda y: flow.energy(y, 300.0), x.double())),
        }, x32, lambda y: flow.energy(y, 300.0))
        rows += precision_rows("cg", {
            "all float32": lambda x: _energy_and_forces(net32, x),
            "float64 priors+features, float32 MLP": lambda x: _energy_and_forces(CGEnergy(net, torch.float32), x),
            "float64, output rounded to float32": lambda x: tuple(
                t.float() for t in _energy_and_forces(net, x.double())),
        }, b32, net)
        results["precision"] += rows
        for row in rows:
            print(f"precision {row['model']:4s} {row['variant']:38s} |dU| median {row['dU_median']:.1e} max "
                  f"{row['dU_max']:.1e} kJ/mol; max|dF|/max|F| median {row['dF_rel_median']:.1e} max "
                  f"{row['dF_rel_max']:.1e} (|U| ~ {row['U_median']:.0f}, max|F| ~ {row['Fmax_median']:.0f})",
                  flush=True)
    if args.only == ["precision"]:
        return

    def say(message: str) -> None:
        print(f"  {message}", flush=True)

    packages = {}
    for label, model, kwargs in (("flow32", flow, {}), ("flow64", flow, {"dtype": "float64"}),
                                 ("flow32_batch", flow, {"batch": True}), ("cg32", cg, {}),
                                 ("cg64", cg, {"dtype": "float64"}), ("cg32_batch", cg, {"batch": True})):
        path = args.workdir / f"{label}.pt2"
        if not path.is_file():
            print(f"compiling {path}", flush=True)
            start = time.perf_counter()
            compile_package(model, path, progress=say, **kwargs)
            results.setdefault("compile_s", {})[label] = time.perf_counter() - start
        packages[label] = load_package(path)
    print("compile seconds:", {k: round(v) for k, v in results.get("compile_s", {}).items()}, flush=True)

    if "precision" in args.only:
        # float32 packages against float64 eager (the error that ships).
        for name, package, xs, reference in (("flow", packages["flow32"], x32, lambda y: flow.energy(y, 300.0)),
                                             ("cg", packages["cg32"], b32, net)):
            out = [package(x) for x in xs]
            rows = precision_rows(name, {"AOTI package float32": lambda x: (
                torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out]))}, xs, reference)
            results["precision"] += rows
            row = rows[0]
            print(f"precision {name:4s} {row['variant']:38s} |dU| median {row['dU_median']:.1e} "
                  f"max {row['dU_max']:.1e}; "
                  f"max|dF|/max|F| median {row['dF_rel_median']:.1e} max {row['dF_rel_max']:.1e}", flush=True)

    if "single" in args.only:
        # Single configuration.
        timing: dict[str, dict[str, float]] = {}
        for name, model, positions in (("flow", flow, frames[450]), ("cg", cg, beads[450])):
            exportable = resolve_exportable(model)
            pt = export_potential(model, args.workdir / f"{name}.pt")
            old_pt = energy_only_torchscript(pt, args.workdir / f"{name}_energy_only.pt")
            with_forces = load_exported(pt).module
            energy_only = load_exported(old_pt).module
            eager = EnergyAndForces(energy_module(exportable, torch.float64))
            x64 = torch.as_tensor(positions, dtype=torch.float64)
            x64_grad = x64.clone().requires_grad_(True)  # as OpenMM-torch passes positions
            x32_one = x64.float()
            run32, run64 = packages[f"{name}32"].runner, packages[f"{name}64"].runner

            def torchscript_energy_only(module=energy_only, x=x64):
                y = x.detach().requires_grad_(True)
                energy = module(y)
                return energy.detach(), -torch.autograd.grad(energy, y)[0]

            methods = {"eager float64": lambda: eager(x64),
                       "TorchScript energy only + autograd": torchscript_energy_only,
                       "TorchScript with forces": lambda: with_forces(x64_grad),
                       "AOTI package float64": lambda: run64(x64),
                       "AOTI package float32": lambda: run32(x32_one)}
            timing[name] = interleaved(methods, args.repeats)
            # OpenMM steps (Reference): per step.
            import openmmtorch
            from openmm_flowforce.export.backends import make_force

            masses = [1.0] * exportable.n_atoms if exportable.masses is None else exportable.masses
            n_steps = 20 if name == "flow" else 200
            old_force = openmmtorch.TorchForce(str(old_pt))
            new_force = openmmtorch.TorchForce(str(pt))
            new_force.setOutputsForces(True)
            steppers = {"OpenMM step: TorchForce, energy-only file": _steps(_system(old_force, masses), positions,
                                                                              n_steps),
                        "OpenMM step: TorchForce, setOutputsForces(True)": _steps(_system(new_force, masses), positions,
                                                                                  n_steps),
                        "OpenMM step: PythonForce, AOTI package float32": _steps(
                            _system(make_force(packages[f"{name}32"].path), masses), positions, n_steps)}
            for label, seconds in interleaved(steppers, args.repeats).items():
                timing[name][label] = seconds / n_steps
        results["single"] = timing
        print("\nper evaluation (µs, median):")
        for label in timing["flow"]:
            print(f"  {label:50s} flow {1e6 * timing['flow'][label]:9.1f}   cg {1e6 * timing['cg'][label]:8.1f}")

    if "batched" in args.only:
        # Batched: per configuration.
        batched: dict[str, dict[str, float]] = {}
        for name, model, data in (("flow", flow, frames), ("cg", cg, beads)):
            exportable = resolve_exportable(model)
            eager64 = EnergyAndForces(energy_module(exportable, torch.float64), batched=True)
            energy32 = energy_module(exportable, torch.float32)
            example = torch.as_tensor(data[:trace_batch_size(exportable.n_atoms)], dtype=torch.float32)
            # Same CPU code-generation workaround as the packages (export/compiled.py docstring).
            compiled = torch.compile(trace_energy_and_forces(energy32, example, batched=True), dynamic=True,
                                     options={"cpp.enable_loop_tail_vec": False})
            runner = packages[f"{name}32_batch"].runner
            for b in args.batches:
                idx = np.arange(b) % len(data)
                xb64 = torch.as_tensor(data[idx], dtype=torch.float64)
                xb32 = xb64.float()
                methods = {"eager float64": lambda: eager64(xb64),
                           "torch.compile float32": lambda: compiled(xb32),
                           "AOTI package float32": lambda: runner(xb32)}
                for label, seconds in interleaved(methods, args.repeats).items():
                    batched.setdefault(name, {}).setdefault(label, {})[b] = seconds / b
        results["batched_per_config"] = batched
        print("\nbatched, per configuration (µs, median):")
        for name in batched:
            for label, per_b in batched[name].items():
                print(f"  {name:4s} {label:24s} " + "  ".join(f"B={b}: {1e6 * s:9.2f}" for b, s in per_b.items()))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
