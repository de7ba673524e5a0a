"""Where one CGSchNet energy + forces evaluation spends its time, at 10, 35 and 100 beads.

    OMP_NUM_THREADS=1 python bench/profile_cg_schnet.py [--sizes 10 35 100] [--max-pairs] \
        [--compare-with OLD/openmm_flowforce/potentials/schnet.py] [--json bench/results/profile_cg_schnet.json]

One configuration per call (what MD does), one thread, the `flowforce cg` default architecture
(64 features, 3 interactions, 32 Gaussians, cutoff 1.2 nm), priors fitted to the frames of
``bench_cg_schnet.py`` (chignolin hairpin at 10 beads, Cα random walks at 35 and 100), float64
priors and features with a float32 network (the compiled package's precisions). Columns, µs:

* ``eager``: ``CGEnergy`` forward + ``autograd.grad`` in eager torch;
* ``graph``: the flat ATen graph (forward and backward, constants folded) that ``torch.export``
  and AOTInductor compile, run op by op; its ops grouped into matrix products, transcendental
  elementwise ops (exp, softplus, cos and their backward), gathers/scatters and the rest
  (the torch profiler's self CPU time, shares of the graph's total);
* ``--compare-with OLD/schnet.py``: the network of another version of ``schnet.py`` (same
  parameters, loaded into it) timed in alternation with this one, eager and as the traced graph,
  and their energies and forces compared (``before_*`` columns);
* pieces, each forward + backward on its own with the shapes of the full call: ``priors``
  (bonds, angles, repulsion), ``basis`` (pair distances, Gaussians, cosine cutoff, on all pairs),
  ``filters`` (the filter networks of every block on every pair), ``net`` (the whole network
  on given distances: basis excluded; filters, messages, updates, readout included).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn import functional

from bench_cg_schnet import CHIGNOLIN, backbone_topology, build_net, chain_frames, hairpin_frames, \
    neighbour_capacity  # this folder

CATEGORIES = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm"),
              "transcendental": ("aten::exp", "aten::softplus", "aten::softplus_backward", "aten::cos", "aten::sin",
                                 "aten::log", "aten::sqrt", "aten::pow"),
              "gather/scatter": ("aten::index", "aten::index_select", "aten::index_add", "aten::index_add_",
                                 "aten::_index_put_impl_", "aten::index_put_", "aten::scatter_add_", "aten::gather",
                                 "aten::topk", "aten::embedding")}


def per_call_us(fn: Callable[[], object], seconds: float = 1.0) -> float:
    """Least over 5 repeats of the mean time per call, after a warm-up (on a loaded machine the least
    disturbed repeat is the best estimate of the cost)."""
    for _ in range(5):
        fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-6)
    reps = max(int(seconds / 5 / once), 3)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) / reps)
    return float(np.min(times)) * 1e6


def forward_backward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        y = x.detach().requires_grad_(True)
        return torch.autograd.grad(fn(y).sum(), y)
    return run


def graph_categories(graph, x: torch.Tensor) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            graph(x)
    totals = {name: 0.0 for name in (*CATEGORIES, "other")}
    for event in prof.key_averages():
        name = next((c for c, ops in CATEGORIES.items() if event.key in ops), "other")
        totals[name] += event.self_cpu_time_total
    whole = sum(totals.values())
    return {name: value / whole for name, value in totals.items()}


def load_other_schnet(path: Path):
    """The module at ``path`` (another version of ``potentials/schnet.py``) imported beside this one;
    the CG net registry is left as it was."""
    import importlib.util

    from openmm_flowforce.potentials.cg_net import CG_NETS

    registry = dict(CG_NETS)
    spec = importlib.util.spec_from_file_location("openmm_flowforce.potentials._schnet_other", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    CG_NETS.clear()
    CG_NETS.update(registry)
    return module


def alternate(fns: dict[str, Callable[[], object]], rounds: int = 5) -> dict[str, float]:
    """Least µs per call of each function over ``rounds`` turns (each :func:`per_call_us`)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(per_call_us(fn, seconds=0.5))
    return {name: float(np.min(values)) for name, values in times.items()}


def profile_size(n: int, max_pairs: bool, other=None) -> dict:
    from openmm_flowforce.coordinates.cg_mapping import CGMapping
    from openmm_flowforce.export.graph import trace_energy_and_forces
    from openmm_flowforce.export.models import CGEnergy

    if n == 10:
        mapping, frames = CGMapping.from_topology(backbone_topology(CHIGNOLIN), "ca"), hairpin_frames()
    else:
        mapping, frames = CGMapping.from_topology(backbone_topology(["ALA"] * n), "ca"), chain_frames(n)
    capacity = neighbour_capacity(frames) if max_pairs else None
    net = build_net("schnet", mapping, frames, capacity)
    energy = CGEnergy(net, torch.float32).eval()
    x = torch.as_tensor(frames[0], dtype=torch.float32)
    graph = trace_energy_and_forces(energy, x)
    network = energy.network
    d = net.features(torch.as_tensor(frames[:1]))
    within = int((d < network.cutoff).sum())

    def basis(y: torch.Tensor) -> torch.Tensor:
        dist = net.features(y.double()).float().reshape(-1, 1)
        rbf = torch.exp(-network.gamma * (dist - network.centres) ** 2)
        return rbf.sum() + torch.where(dist < network.cutoff, torch.cos(dist), torch.zeros_like(dist)).sum()

    n_filtered = d.shape[1] if not network.max_pairs else network.max_pairs
    rbf = torch.rand(n_filtered, len(network.centres))

    def filters(r: torch.Tensor) -> torch.Tensor:
        total = r.new_zeros(())
        for block in network.interactions:
            first, second = block.filter[0], block.filter[2]
            hidden = functional.softplus(functional.linear(r, first.weight, first.bias))
            total = total + functional.linear(hidden, second.weight, second.bias).sum()
        return total

    row = {"beads": n, "pairs": int(d.shape[1]), "pairs_within_cutoff": within, "max_pairs": capacity,
           "eager_us": per_call_us(forward_backward(lambda y: energy(y.unsqueeze(0)), x)),
           "graph_us": per_call_us(lambda: graph(x)),
           "priors_us": per_call_us(forward_backward(lambda y: net.prior_energy(y.double().unsqueeze(0)), x)),
           "basis_us": per_call_us(forward_backward(basis, x.unsqueeze(0))),
           "filters_us": per_call_us(forward_backward(filters, rbf)),
           "net_us": per_call_us(forward_backward(lambda dist: network(dist), d.float())),
           "graph_shares": graph_categories(graph, x)}
    if other is not None:
        import copy

        old = copy.deepcopy(net)
        cfg = net.config()
        old.network = other.SchNetEnergy(cfg["bead_types"], cfg["n_types"], cfg["hidden"], cfg["interactions"],
                                         cfg["n_rbf"], cfg["cutoff_nm"]).double()
        old.network.load_state_dict(net.network.state_dict())
        old_energy = CGEnergy(old, torch.float32).eval()
        old_graph = trace_energy_and_forces(old_energy, x)
        x64 = torch.as_tensor(frames[:8])
        e_new, f_new = (t.detach() for t in net.energy_and_forces(x64))
        e_old, f_old = (t.detach() for t in old.energy_and_forces(x64))
        timing = alternate({"eager_us": forward_backward(lambda y: energy(y.unsqueeze(0)), x),
                            "before_eager_us": forward_backward(lambda y: old_energy(y.unsqueeze(0)), x),
                            "graph_us": lambda: graph(x), "before_graph_us": lambda: old_graph(x)})
        row.update(timing)
        row["max_abs_energy_difference_float64"] = float((e_new - e_old).abs().max())
        row["max_abs_force_difference_float64"] = float((f_new - f_old).abs().max())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[10, 35, 100])
    parser.add_argument("--max-pairs", action="store_true",
                        help="CGSchNet with a neighbour list (max_pairs = 1.25 x the most pairs within the cutoff)")
    parser.add_argument("--compare-with", type=Path, metavar="OLD/schnet.py",
                        help="time this version's network against another version of potentials/schnet.py")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    other = None if args.compare_with is None else load_other_schnet(args.compare_with)
    rows = []
    for n in args.sizes:
        row = profile_size(n, args.max_pairs, other)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
