"""CG MD speed of chignolin (10 Cα beads) with CGSchNet and the MLP CG net, through every force backend.

    python bench/bench_cg_schnet.py [--steps 2000] [--platforms Reference CPU] [--nets schnet mlp] \
        [--scaling 10 35 100] [--scaling-platforms Reference CPU] [--max-pairs] \
        [--json bench/results/bench_cg_schnet.json]

Rows (Langevin 2 fs, 300 K, steps/s after warm-up):
* chignolin Cα (GYDPETGTWG, 10 beads, bead types from the residue names) for each net in
  ``--nets`` at its `flowforce cg` default architecture (SchNet: 64 features, 3 interactions,
  32 radial functions, cutoff 1.2 nm; MLP: hidden 64, 64), priors (bonds, angles, repulsion)
  fitted to frames scattered around a β-hairpin, through TorchForce (TorchScript), PythonForce
  running the float32 AOTInductor package, and the native plugin running the same package;
* ``--scaling``: Reference platform, Cα chains of n beads (random walks), the nets of ``--nets``
  through ``--scaling-backends`` (default TorchForce; ``native`` compiles a package per net and
  size), ``--scaling-steps`` timed steps, on ``--scaling-platforms``: how the cost grows with the
  protein; ``--max-pairs`` gives CGSchNet a neighbour list there (1.25 × the most pairs within the
  cutoff in the frames).
Packages are float32 (`compile_package` default); compiling one takes about a minute and is
not timed. Speed does not depend on training, so the readout is random (an untrained net adds
nothing and might be optimised away). Times swing on a shared machine: read the ratios.
"""
from __future__ import annotations

import argparse
import platform as host
import tempfile
import time
from pathlib import Path

import numpy as np
import openmm
import torch
from openmm import app

from bench_md import _steps_per_second as steps_per_second, _system as cg_system, write_results  # this folder

CHIGNOLIN = ("GLY", "TYR", "ASP", "PRO", "GLU", "THR", "GLY", "THR", "TRP", "GLY")


def backbone_topology(residues) -> app.Topology:
    """N, CA, C of every residue, bonded along one chain (what the ``ca`` mapping needs)."""
    top = app.Topology()
    chain = top.addChain("A")
    previous = None
    for k, name in enumerate(residues):
        residue = top.addResidue(name, chain, str(k + 1))
        atoms = [top.addAtom(atom, app.Element.getBySymbol(atom[0]), residue) for atom in ("N", "CA", "C")]
        top.addBond(atoms[0], atoms[1])
        top.addBond(atoms[1], atoms[2])
        if previous is not None:
            top.addBond(previous, atoms[0])
        previous = atoms[2]
    return top


def hairpin_frames(n_frames: int = 500, seed: int = 0) -> np.ndarray:
    """Chignolin-like Cα frames (nm): a β-hairpin (strands 0.5 nm apart, out-of-plane zig-zag) + 0.03 nm noise."""
    x = [(0.35 * k, 0.0) for k in range(5)] + [(0.35 * (4 - k), 0.5) for k in range(5)]
    base = np.array([(a, b, 0.1 * (-1) ** k) for k, (a, b) in enumerate(x)])
    return base[None] + 0.03 * np.random.default_rng(seed).standard_normal((n_frames, 10, 3))


def chain_frames(n: int, n_frames: int = 200, seed: int = 0) -> np.ndarray:
    """Self-avoiding-ish random-walk Cα chains of n beads (0.38 nm bonds), + 0.02 nm noise per frame."""
    rng = np.random.default_rng(seed)
    steps = rng.standard_normal((n, 3))
    steps[:, 0] = np.abs(steps[:, 0]) + 0.8  # drift along x keeps distant beads apart
    steps *= 0.38 / np.linalg.norm(steps, axis=1, keepdims=True)
    base = np.cumsum(steps, axis=0)
    return base[None] + 0.02 * rng.standard_normal((n_frames, n, 3))


def neighbour_capacity(frames: np.ndarray, cutoff_nm: float = 1.2) -> int:
    """``max_pairs`` for CGSchNet: 1.25 × the most pairs within the cutoff in any frame."""
    d = np.linalg.norm(frames[:, :, None] - frames[:, None, :], axis=-1)
    within = ((d < cutoff_nm).sum((1, 2)) - frames.shape[1]) // 2
    return int(np.ceil(1.25 * within.max()))


def build_net(kind: str, mapping, frames, max_pairs: int | None = None):
    from openmm_flowforce.potentials.cg_net import cg_net_class

    torch.manual_seed(0)
    options = {"hidden": (64, 64)} if kind == "mlp" else {}
    if kind == "schnet" and max_pairs is not None:
        options["max_pairs"] = max_pairs
    net = cg_net_class(kind).from_data(mapping, frames, 300.0, **options).double().eval()
    last = net.network[-1] if kind == "mlp" else net.network.readout[-1]
    torch.nn.init.normal_(last.weight, std=0.1)
    return net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="timed steps per row")
    parser.add_argument("--platforms", nargs="+", default=["Reference", "CPU"])
    parser.add_argument("--nets", nargs="+", default=["schnet", "mlp"], choices=["schnet", "mlp"])
    parser.add_argument("--backends", nargs="+", default=["torchforce", "pythonforce", "native"],
                        choices=["torchforce", "pythonforce", "native"])
    parser.add_argument("--scaling", nargs="*", type=int, default=[], metavar="N",
                        help="also time TorchForce on Cα chains of these bead counts (Reference platform)")
    parser.add_argument("--scaling-steps", type=int, default=100, help="timed steps of the --scaling rows")
    parser.add_argument("--scaling-backends", nargs="+", default=["torchforce"], choices=["torchforce", "native"],
                        help="backends of the --scaling rows (native compiles a package per net and size)")
    parser.add_argument("--scaling-platforms", nargs="+", default=["Reference"], help="platforms of the --scaling rows")
    parser.add_argument("--max-pairs", action="store_true",
                        help="--scaling rows: CGSchNet with a neighbour list (max_pairs = 1.25 x the most pairs "
                             "within the cutoff in the frames) instead of all pairs")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)

    from openmm_flowforce.coordinates.cg_mapping import CGMapping
    from openmm_flowforce.export.backends import make_force
    from openmm_flowforce.export.compiled import compile_package
    from openmm_flowforce.export.native import native_unavailable
    from openmm_flowforce.export.torchscript import export_potential

    backends = list(args.backends)
    if "native" in backends and native_unavailable() is not None:
        print(f"native plugin unavailable: {native_unavailable()}")
        backends.remove("native")
    mapping = CGMapping.from_topology(backbone_topology(CHIGNOLIN), "ca")
    frames = hairpin_frames()
    rows = []

    def record(name: str, system, start, platform: str, steps: int) -> None:
        rate = steps_per_second(system, start, platform, steps, timestep_ps=0.002)
        rows.append({"system": name, "platform": platform, "steps_per_s": rate, "us_per_step": 1e6 / rate,
                     "steps": steps})
        print(f"{name:<48} {platform:<10} {rate:>9.0f} steps/s {1e6 / rate:>9.1f} µs/step", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for kind in args.nets:
            net = build_net(kind, mapping, frames)
            model = (net, mapping, mapping.pdb_text(frames[0]))
            sources = {"torchforce": export_potential(model, tmp / f"{kind}.pt")}
            if {"pythonforce", "native"} & set(backends):
                print(f"compiling the {kind} package (about a minute) ...", flush=True)
                t0 = time.perf_counter()
                package = compile_package(model, tmp / f"{kind}.pt2")
                print(f"  compiled in {time.perf_counter() - t0:.0f} s", flush=True)
                sources.update(pythonforce=package, native=package)
            for backend in backends:
                system = cg_system(mapping.masses, make_force(sources[backend], backend=backend))
                for plat in args.platforms:
                    record(f"chignolin Cα (10), {kind}: {backend}", system, frames[0], plat, args.steps)
        for n in args.scaling:
            chain = CGMapping.from_topology(backbone_topology(["ALA"] * n), "ca")
            x = chain_frames(n)
            for kind in args.nets:
                capacity = neighbour_capacity(x) if args.max_pairs and kind == "schnet" else None
                net = build_net(kind, chain, x, capacity)
                model = (net, chain, chain.pdb_text(x[0]))
                label = kind if capacity is None else f"{kind} max_pairs={capacity}"
                for backend in args.scaling_backends:
                    source = (export_potential(model, tmp / f"{kind}{n}.pt") if backend == "torchforce"
                              else compile_package(model, tmp / f"{kind}{n}.pt2"))
                    system = cg_system(chain.masses, make_force(source, backend=backend))
                    for plat in args.scaling_platforms:
                        record(f"Cα chain ({n}), {label}: {backend}", system, x[0], plat, args.scaling_steps)
    meta = {"torch": torch.__version__, "openmm": openmm.__version__, "machine": host.machine(),
            "torch_threads": args.torch_threads}
    write_results(args.json, meta, rows)


if __name__ == "__main__":
    main()
