"""MLP vs CGSchNet (and smaller CGSchNets) by force matching on chignolin Cα data, at one training budget.

    python bench/bench_cg_nets_chignolin.py --data /work/chig/ref.npz --steps 600 --batch-size 128 \
        --json bench/results/bench_cg_nets_chignolin.json
    python bench/bench_cg_nets_chignolin.py --data toy --steps 300 --batch-size 64 \
        --json bench/results/bench_cg_nets_chignolin_toy.json

``toy`` data have a known mean force (:func:`toy_data`), so the rows also give the loss against it.
Otherwise the data is ``bench/bench_chignolin.py``'s reference (all-atom GBn2 replicas with forces, mapped here
to 10 Cα beads); the file is read, never written. Every net gets the same priors (bonds, angles,
repulsion, fitted to the training frames), the same optimiser settings, steps, batch size, seed and
validation split (``flowforce cg``'s: the last ``--val-fraction`` of the frames, a contiguous block)
and ``train_cg_net`` loop as ``flowforce cg --method force-matching``, but without early stopping on
the validation frames, so the rows show where each net ends after the budget. Rows: the force loss
(``force_matching_loss``, per component over the RMS training force) on the training and on the
validation frames, of the priors alone and after training; parameters; training seconds.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench_md import write_results  # this folder

#: Nets compared: name → ``net`` options of ``flowforce cg``.
NETS = {
    "mlp (64, 64)": {"kind": "mlp", "hidden": [64, 64]},
    "schnet 64/3/32 (default)": {"kind": "schnet"},
    "schnet 32/3/16": {"kind": "schnet", "schnet": {"hidden": 32, "interactions": 3, "n_rbf": 16}},
    "schnet 32/2/16": {"kind": "schnet", "schnet": {"hidden": 32, "interactions": 2, "n_rbf": 16}},
}


def toy_data(n_frames: int = 2000, seed: int = 0):
    """Chignolin-like Cα data with a known mean force (``tests/test_cg_schnet.py``'s fixture, larger):
    frames around a β-hairpin, forces of stiff bonds plus a Gaussian contact between beads 1 and 8,
    and noise of 20 kJ/mol/nm per component as mapped all-atom forces have. Returns the mapping,
    positions, noisy forces and the noise-free forces, ``(T, 10, 3)`` nm and kJ/mol/nm."""
    import numpy as np

    from bench_cg_schnet import CHIGNOLIN, backbone_topology, hairpin_frames  # this folder
    from openmm_flowforce.coordinates.cg_mapping import CGMapping

    mapping = CGMapping.from_topology(backbone_topology(CHIGNOLIN), "ca")
    x = torch.as_tensor(hairpin_frames(n_frames, seed)).requires_grad_(True)
    bonds = torch.linalg.vector_norm(x[:, 1:] - x[:, :-1], dim=-1)
    contact = torch.linalg.vector_norm(x[:, 1] - x[:, 8], dim=-1)
    energy = (500.0 * (bonds - 0.38) ** 2).sum(-1) - 20.0 * torch.exp(-((contact - 0.5) / 0.1) ** 2)
    (gradient,) = torch.autograd.grad(energy.sum(), x)
    noise = 20.0 * np.random.default_rng(seed + 1).standard_normal(tuple(x.shape))
    return mapping, x.detach(), -gradient + torch.as_tensor(noise), -gradient


def losses(net, x, f, scale: float) -> float:
    from openmm_flowforce.training.cg import _validation_loss

    return _validation_loss(net, x, f, scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True,
                        help="all-atom dataset with forces (npz), or 'toy': chignolin-like data with a known mean force")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from openmm_flowforce.coordinates.cg_mapping import CGMapping
    from openmm_flowforce.data.dataset import load_dataset
    from openmm_flowforce.training.boltzmann import split_frames
    from openmm_flowforce.training.cg import force_scale_of, train_cg_net
    from openmm_flowforce.training.flow_matching import build_cg_net
    from openmm_flowforce.training.trainer import TrainConfig

    mean_force = None
    if args.data == "toy":
        mapping, x, f, mean_force = toy_data()
        frames, temperature = len(x), 300.0
    else:
        data = load_dataset(args.data)
        mapping = CGMapping.from_topology(data.topology, "ca")
        x = torch.as_tensor(mapping.map_positions(data.positions), dtype=torch.float64)
        f = torch.as_tensor(mapping.map_forces(data.forces), dtype=torch.float64)
        frames, temperature = int(data.n_frames), float(data.temperature)
    train, val = split_frames(len(x), args.val_fraction)
    scale = force_scale_of(f[train])
    rows = []
    for name in args.nets:
        torch.manual_seed(0)
        net = build_cg_net(mapping, x[train].numpy(), temperature, NETS[name]).to(torch.float64)
        before = losses(net, x[train], f[train], scale), losses(net, x[val], f[val], scale)
        before_mean = None if mean_force is None else losses(net, x[val], mean_force[val], scale)
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, validate_every=0)
        t0 = time.perf_counter()
        train_cg_net(net, x[train], f[train], config, val_fraction=0.0, progress=False)
        seconds = time.perf_counter() - t0
        after = losses(net, x[train], f[train], scale), losses(net, x[val], f[val], scale)
        row = {"net": name, "options": NETS[name], "parameters": sum(p.numel() for p in net.parameters()),
               "train_loss_priors_only": before[0], "val_loss_priors_only": before[1],
               "train_loss": after[0], "val_loss": after[1], "steps": args.steps, "train_seconds": seconds}
        if mean_force is not None:  # the loss against the known mean force: 0 for a perfect model
            row["val_loss_to_mean_force_priors_only"] = before_mean
            row["val_loss_to_mean_force"] = losses(net, x[val], mean_force[val], scale)
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"data": str(args.data), "frames": frames, "steps": args.steps, "batch_size": args.batch_size,
            "lr": args.lr, "val_fraction": args.val_fraction, "force_scale": scale, "torch": torch.__version__}
    write_results(args.json, meta, rows)


if __name__ == "__main__":
    main()
