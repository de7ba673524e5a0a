"""Native-plugin CG MD speed of compiled CG packages, timed in alternation (A/B) so that a loaded
machine slows every package alike.

    # 1. compile (once per code version: run it with the old tree first on PYTHONPATH, then the new)
    python bench/bench_cg_speed_ab.py compile --out DIR --tag before --nets schnet --sizes 10 35 100
    python bench/bench_cg_speed_ab.py compile --out DIR --tag after --nets schnet mlp --sizes 10 35 100 [--max-pairs]
    # 2. time every package in DIR, round-robin
    python bench/bench_cg_speed_ab.py time --out DIR --platforms Reference CPU --rounds 5 --seconds 1 \
        [--all-atom chig/ref.npz] --json bench/results/bench_cg_speed_ab.json

A package is self-contained (an AOTInductor ``.pt2``), so packages compiled from two versions of
the code run side by side in one timing process. The nets are ``bench_cg_schnet.build_net``'s
(seeded: the same weights in every version), chignolin's 10 Cα beads at 10, Cα random walks at
35 and 100; float32 packages with one thread (as ``bench_chignolin.py`` compiles them).
Rows: median steps/s over ``--rounds`` rounds (Langevin 2 fs, 300 K), µs/step, and ns/day at
the 5 fs time step the chignolin CG MD uses; with ``--all-atom REF.npz`` also the all-atom GBn2
System of that dataset (HMR, 4 fs, CPU platform, one thread) in the same rounds, for the CG/all-atom
ratio under the same load.
"""
from __future__ import annotations

import argparse
import json
import platform as host
from pathlib import Path

import numpy as np
import openmm
import torch

from bench_cg_schnet import CHIGNOLIN, backbone_topology, build_net, chain_frames, hairpin_frames, \
    neighbour_capacity  # this folder
from bench_md import _steps_per_second as steps_per_second, _system as cg_system  # this folder


def system_of(n: int):
    from openmm_flowforce.coordinates.cg_mapping import CGMapping

    if n == 10:
        return CGMapping.from_topology(backbone_topology(CHIGNOLIN), "ca"), hairpin_frames()
    return CGMapping.from_topology(backbone_topology(["ALA"] * n), "ca"), chain_frames(n)


def compile_all(args: argparse.Namespace) -> None:
    from openmm_flowforce.export.compiled import compile_package

    args.out.mkdir(parents=True, exist_ok=True)
    for n in args.sizes:
        mapping, frames = system_of(n)
        for kind in args.nets:
            capacities = [None] + ([neighbour_capacity(frames)] if args.max_pairs and kind == "schnet" else [])
            for capacity in capacities:
                name = f"{args.tag}_{kind}{'' if capacity is None else f'_maxpairs{capacity}'}_{n}"
                net = build_net(kind, mapping, frames, capacity)
                compile_package((net, mapping, mapping.pdb_text(frames[0])), args.out / f"{name}.pt2", threads=1)
                np.save(args.out / f"{name}.start.npy", frames[0])
                print(f"compiled {name}", flush=True)


def energy_and_forces(system, positions) -> tuple[float, np.ndarray]:
    from openmm import unit

    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions * unit.nanometer)
    state = context.getState(getEnergy=True, getForces=True)
    return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))


def compare_versions(systems: dict) -> dict[str, dict[str, float]]:
    """Energy and forces through the native plugin of every package against the ``before_`` package
    of the same net and size (the same weights), at its start positions perturbed by 0.02 nm."""
    out = {}
    for name, (system, start) in systems.items():
        if name.startswith("before_"):
            continue
        twin = "before_" + name.split("_", 1)[1].replace(name.split("_")[2] + "_", "") \
            if "_maxpairs" in name else "before_" + name.split("_", 1)[1]
        if twin not in systems:
            continue
        x = start + 0.02 * np.random.default_rng(0).standard_normal(start.shape)
        energy, forces = energy_and_forces(system, x)
        want_energy, want_forces = energy_and_forces(systems[twin][0], x)
        out[name] = {"vs": twin, "abs_energy_difference": abs(energy - want_energy), "energy": want_energy,
                     "max_abs_force_difference": float(np.abs(forces - want_forces).max()),
                     "max_abs_force": float(np.abs(want_forces).max())}
        print(f"{name} vs {twin}: {out[name]}", flush=True)
    return out


def time_all(args: argparse.Namespace) -> None:
    from openmm_flowforce.export.backends import make_force
    from openmm_flowforce.export.compiled import read_package_metadata

    torch.set_num_threads(1)
    packages = sorted(args.out.glob("*.pt2"))
    systems = {}
    for path in packages:
        masses = read_package_metadata(path)["masses"]
        systems[path.stem] = (cg_system(masses, make_force(path, backend="native")),
                              np.load(path.with_suffix(".start.npy"), allow_pickle=False))
    agreement = compare_versions(systems)
    jobs = [(name, plat) for name in systems for plat in args.platforms]
    if args.all_atom is not None:
        # the all-atom reference System itself (GBn2, HMR), 4 fs, CPU platform, one thread
        from openmm_flowforce.data.dataset import load_dataset
        from openmm_flowforce.safety import deserialize_xml

        data = load_dataset(args.all_atom)
        systems["all-atom"] = (deserialize_xml(data.system_xml, str(args.all_atom)), data.positions[0])
        jobs.append(("all-atom", "CPU"))
    timestep = {name: 0.004 if name == "all-atom" else 0.002 for name in systems}
    rates: dict[tuple[str, str], list[float]] = {}
    steps = {(name, plat): max(50, int(args.seconds * steps_per_second(*systems[name], plat, 30, timestep[name])))
             for name, plat in jobs}
    for r in range(args.rounds):
        for name, plat in jobs:
            rate = steps_per_second(*systems[name], plat, steps[name, plat], timestep_ps=timestep[name])
            rates.setdefault((name, plat), []).append(rate)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    rows = []
    for (name, plat), values in rates.items():
        rate = float(np.median(values))
        fs = 4 if name == "all-atom" else 5  # the time steps the chignolin bench runs them at
        rows.append({"package": name, "platform": plat, "steps_per_s": rate, "us_per_step": 1e6 / rate,
                     "timestep_fs": fs, "ns_per_day": rate * fs * 1e-6 * 86400, "steps": steps[name, plat],
                     "rounds": values})
        print(f"{name:<36} {plat:<10} {rate:>8.0f} steps/s {1e6 / rate:>9.1f} µs/step "
              f"{rate * fs * 1e-6 * 86400:>8.0f} ns/day at {fs} fs", flush=True)
    meta = {"torch": torch.__version__, "openmm": openmm.__version__, "machine": host.machine(),
            "rounds": args.rounds, "seconds": args.seconds, "agreement": agreement}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["compile", "time"])
    parser.add_argument("--out", type=Path, required=True, help="folder of the packages")
    parser.add_argument("--tag", default="after", help="compile: name prefix of the packages")
    parser.add_argument("--nets", nargs="+", default=["schnet"], choices=["schnet", "mlp"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[10, 35, 100])
    parser.add_argument("--max-pairs", action="store_true", help="compile: also CGSchNet with a neighbour list")
    parser.add_argument("--platforms", nargs="+", default=["Reference", "CPU"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="about this long per package, platform and round (steps from a 30-step probe)")
    parser.add_argument("--all-atom", type=Path, metavar="REF.npz",
                        help="time: also the all-atom System stored in this dataset (bench_chignolin.py's ref.npz), "
                             "4 fs, CPU platform, in the same rounds")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    (compile_all if args.mode == "compile" else time_all)(args)


if __name__ == "__main__":
    main()
