"""What one FAB AIS run does on alanine dipeptide: how far it moves φ/ψ, its acceptance, and
how degenerate its weights are, for FAB checkpoints (bench_fab_alanine.py work folders).

Runs the checkpoint's own AIS (its AIS space, levels and adapted step sizes, no adaptation)
on 128 fresh flow samples and reports the mean |Δφ| and |Δψ| between start and end, the
acceptance per level, and the Kish ESS of the AIS weights and of the flow's own weights p/q.

    python bench/fab_ais_probe.py fabv/int/fab.ckpt fabv/cart/fab.ckpt --json probe.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch


def probe(path: str, n: int = 128, seed: int = 0) -> dict:
    from openmm_flowforce.analysis.molecule_sampler import backbone_dihedral_atoms
    from openmm_flowforce.io import load_checkpoint
    from openmm_flowforce.reweighting import effective_sample_size
    from openmm_flowforce.samplers.common import load_sampler
    from openmm_flowforce.samplers.flow_training import EnergyCounter, TrainContext, resolve_options

    loaded = load_sampler(path)
    method, model, target = loaded.method, loaded.model, loaded.target
    opts = resolve_options(method.options(loaded.options), target)
    extra = method.init_extra(model, target, opts)
    method.load_extra(extra, load_checkpoint(path)["engine"]["state"]["extra"])
    ctx = TrainContext(model, EnergyCounter(target), torch.optim.Adam(model.parameters()), opts, extra)
    atoms = backbone_dihedral_atoms(target.topology)
    sample = model.sample
    starts: list[torch.Tensor] = []

    def recording_sample(k: int) -> torch.Tensor:
        x = sample(k)
        starts.append(x.clone())
        return x

    torch.manual_seed(seed)
    model.sample = recording_sample
    try:
        result, _ = method.run_ais(ctx, n, adapt=False)
    finally:
        model.sample = sample
    start, end = starts[0], result.x

    def dihedral(x: torch.Tensor, idx) -> torch.Tensor:
        p = x.reshape(len(x), -1, 3)[:, list(idx)]
        b0, b1, b2 = p[:, 0] - p[:, 1], p[:, 2] - p[:, 1], p[:, 3] - p[:, 2]
        axis = b1 / b1.norm(dim=-1, keepdim=True)
        v = b0 - (b0 * axis).sum(-1, keepdim=True) * axis
        w = b2 - (b2 * axis).sum(-1, keepdim=True) * axis
        return torch.atan2((torch.cross(axis, v, dim=-1) * w).sum(-1), (v * w).sum(-1))

    moved = {}
    for name in ("phi", "psi"):
        delta = dihedral(end, atoms[name]) - dihedral(start, atoms[name])
        moved[f"mean_abs_d{name}_rad"] = float((torch.remainder(delta + math.pi, 2 * math.pi) - math.pi).abs().mean())
    return {"checkpoint": path, "ais_space": opts["ais_space"], "steps": loaded.checkpoint["summary"]["steps"],
            "step_sizes": [float(v) for v in extra["step_sizes"]], "accept": [float(a) for a in result.accept],
            **moved, "ess_ais": effective_sample_size(result.log_w),
            "ess_flow": effective_sample_size(0.5 * result.log_w_initial), "chains": n}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [probe(path) for path in args.checkpoints]
    for row in rows:
        print(f"{row['checkpoint']} ({row['ais_space']}, {row['steps']} steps): step sizes "
              f"{', '.join(f'{v:.2g}' for v in row['step_sizes'])}; acceptance "
              f"{', '.join(f'{a:.2f}' for a in row['accept'])}; mean |dphi| {row['mean_abs_dphi_rad']:.3f}, "
              f"|dpsi| {row['mean_abs_dpsi_rad']:.3f} rad; ESS of the AIS weights {row['ess_ais']:.4f}, "
              f"of p/q {row['ess_flow']:.4f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
