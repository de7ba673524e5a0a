"""Force matching in internal coordinates and torsion-jittered flow-matching points (issue 15 §1)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from openmm_flowforce.coordinates.cg_mapping import CGMapping
from openmm_flowforce.errors import FlowforceError
from openmm_flowforce.potentials.cg_net import CGEnergyNet
from openmm_flowforce.training.cg import train_cg_net
from openmm_flowforce.training.internal_forces import InternalForceLoss, internal_coordinates, projection_matrices


@pytest.fixture(scope="module")
def backbone(alanine_md):
    mapping = CGMapping.from_topology(alanine_md["topology"], "backbone")
    x = torch.as_tensor(mapping.map_positions(alanine_md["positions"].astype(np.float64)))
    return mapping, x, internal_coordinates(mapping.cg_topology())


def _q(ic, x):
    return torch.cat(ic.to_internal(x, check=False), dim=-1)


def test_projection_recovers_generalised_forces(backbone):
    """For U = Σ c_k sin(q_k) the Cartesian force F = −∇ₓU maps to G = −∂U/∂q = −c cos q exactly,
    also after a random rotation and translation of the frames (P is computed in their own frame)."""
    _, x, ic = backbone
    rotation = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))[0]
    x = x[:40] @ rotation.T + torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    c = torch.linspace(-2.0, 3.0, ic.dim, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    q = _q(ic, xg)
    (grad,) = torch.autograd.grad((c * torch.sin(q)).sum(), xg)
    g = InternalForceLoss.generalised(projection_matrices(ic, x), -grad)
    assert torch.allclose(g, -c * torch.cos(q.detach()), atol=1e-10, rtol=0)


def test_internal_loss_is_zero_only_for_the_right_forces(backbone):
    """The loss of the target itself is 0; a zero force field scores 1 (the scales are RMS); and a
    force along a rigid rotation (no internal component) costs nothing."""
    mapping, x, ic = backbone
    x = x[:64]
    net = CGEnergyNet.from_data(mapping, x.numpy(), 300.0, hidden=[8]).double()
    _, forces = net.energy_and_forces(x)
    forces = forces.detach()
    loss = InternalForceLoss(ic)
    p = loss.projections(x)
    loss.fit_scales(p, forces)
    assert float(loss(p, forces, forces)) < 1e-20
    assert float(loss(p, torch.zeros_like(forces), forces)) == pytest.approx(1.0, rel=1e-12)
    centre = x.mean(1, keepdim=True)
    spin = torch.cross(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand_as(x), x - centre, dim=-1)
    assert float(loss(p, forces + 50.0 * spin, forces)) < 1e-18


def test_internal_loss_weights_are_checked(backbone):
    _, _, ic = backbone
    with pytest.raises(FlowforceError, match="unknown internal-coordinate kind"):
        InternalForceLoss(ic, {"dihedral": 1.0})
    with pytest.raises(FlowforceError, match="not all 0"):
        InternalForceLoss(ic, {"bond": 0.0, "angle": 0.0, "torsion": 0.0})


def test_train_cg_net_with_internal_loss_learns_a_known_net(backbone):
    """Matching a teacher net's forces through the internal loss lowers the loss well below the
    priors-only start, in float64 (the loss path differentiates through the projection)."""
    mapping, x, ic = backbone
    x = x[:400]
    torch.manual_seed(0)
    teacher = CGEnergyNet.from_data(mapping, x.numpy(), 300.0, hidden=[16]).double()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
    _, target = teacher.energy_and_forces(x)
    student = CGEnergyNet.from_data(mapping, x.numpy(), 300.0, hidden=[16]).double()
    from openmm_flowforce.training.trainer import TrainConfig

    fit = train_cg_net(student, x, target.detach(), TrainConfig(steps=80, batch_size=64, lr=3e-3, validate_every=50),
                       progress=False, internal=InternalForceLoss(ic))
    assert fit.best_val_loss < 0.5 * fit.initial_val_loss


def test_jitter_turns_only_periodic_torsions(backbone):
    """Jittered flow samples keep their bonds and angles, change their periodic torsions by about
    sigma, and come with the flow's forces there (finite-difference check of one frame)."""
    from openmm_flowforce.potentials import BoltzmannGenerator
    from openmm_flowforce.training.flow_matching import jitter_torsions

    mapping, x, _ = backbone
    torch.manual_seed(0)
    model = BoltzmannGenerator.from_topology(mapping.cg_topology(), x.numpy(), n_layers=2, hidden=[8],
                                             n_components=2).double()
    start = x[:200].numpy()
    turned, reduced, log_q = jitter_torsions(model, start, sigma_rad=0.5, seed=3)
    ic = model.coordinates
    b0, a0, t0 = ic.to_internal(torch.as_tensor(start), check=False)
    b1, a1, t1 = ic.to_internal(torch.as_tensor(turned), check=False)
    assert torch.allclose(b0, b1, atol=1e-10) and torch.allclose(a0, a1, atol=1e-9)
    periodic = torch.tensor(ic.periodic[-t0.shape[1]:])
    turn = torch.remainder(t1 - t0 + math.pi, 2 * math.pi) - math.pi
    assert float(turn[:, periodic].std()) == pytest.approx(0.5, rel=0.15)
    assert torch.allclose(turn[:, ~periodic], torch.zeros(1, dtype=torch.float64), atol=1e-9)
    frame = torch.as_tensor(turned[:1]).clone()
    eps, (i, k) = 1e-6, (2, 1)
    plus, minus = frame.clone(), frame.clone()
    plus[0, i, k] += eps
    minus[0, i, k] -= eps
    with torch.no_grad():
        fd = float(model.log_prob(plus) - model.log_prob(minus)) / (2 * eps)
        assert float(model.log_prob(frame)) == pytest.approx(float(log_q[0]), rel=1e-12)
    assert fd == pytest.approx(float(reduced[0, i, k]), rel=1e-5, abs=1e-5)


def test_energy_term_fixes_an_offset_between_regions(backbone):
    """Forces cannot see a constant step between two regions the data never connect; the
    energy term can. Target: a teacher net plus 5 kJ/mol on frames with ψ above its median (a
    step in energy with zero force). With forces only the student's energy difference between the
    regions is the teacher's; with energy_weight it moves towards the +5 kJ/mol."""
    from openmm_flowforce.analysis.fes import compute_cvs, parse_cv
    from openmm_flowforce.training.trainer import TrainConfig

    mapping, x, _ = backbone
    x = x[:600]
    psi = torch.as_tensor(compute_cvs(x.numpy(), [parse_cv("dihedral:1,2,3,4")])[:, 0])
    upper = psi > psi.median()
    torch.manual_seed(0)
    teacher = CGEnergyNet.from_data(mapping, x.numpy(), 300.0, hidden=[16]).double()
    energy, forces = teacher.energy_and_forces(x)
    target = energy.detach() + 5.0 * upper.double()

    def gap(weight: float) -> float:
        torch.manual_seed(1)
        student = CGEnergyNet.from_data(mapping, x.numpy(), 300.0, hidden=[16]).double()
        train_cg_net(student, x, forces.detach(), TrainConfig(steps=200, batch_size=128, lr=3e-3, validate_every=0),
                     progress=False, val_fraction=0.0, energies=target, energy_weight=weight)
        e = student.energy_and_forces(x)[0].detach() - energy.detach()
        return float(e[upper].mean() - e[~upper].mean())

    assert abs(gap(0.0)) < 2.0
    assert gap(1.0) > 3.0


def test_flow_ensemble_averages_members(backbone):
    """The ensemble's log q and forces are the members' means; one member is the flow itself."""
    from openmm_flowforce.potentials import BoltzmannGenerator
    from openmm_flowforce.training.flow_samples import FlowEnsemble, sample_flow_forces

    mapping, x, _ = backbone
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append(BoltzmannGenerator.from_topology(mapping.cg_topology(), x.numpy(), n_layers=2, hidden=[8],
                                                        n_components=2, identity_init=False).double())
    frames = x[:20]
    log_q, forces = FlowEnsemble(members).log_q_and_forces(frames)
    singles = [FlowEnsemble([m]).log_q_and_forces(frames) for m in members]
    assert torch.allclose(log_q, (singles[0][0] + singles[1][0]) / 2, atol=1e-12)
    assert torch.allclose(forces, (singles[0][1] + singles[1][1]) / 2, atol=1e-12)
    assert not torch.allclose(singles[0][1], singles[1][1], atol=1e-3), "members must differ for the test to mean anything"
    xs, fs, us = sample_flow_forces(FlowEnsemble(members), 8, 300.0, batch_size=4, seed=2, return_energies=True)
    assert xs.shape == (8, 5, 3) and np.isfinite(fs).all() and np.isfinite(us).all()


def test_coarse_grain_with_ensemble_jitter_and_energy(alanine_md, tmp_path):
    """The options reach the pipeline: two flow files, turned points counted, the model written."""
    from openmm_flowforce.training.flow_matching import coarse_grain

    opts = {"flow": {"n_layers": 1, "hidden": [8], "n_components": 2}, "flow_train": {"steps": 3},
            "flow_samples": 64, "flow_ensemble": 2, "torsion_jitter": {"fraction": 0.5, "sigma_rad": 1.0},
            "cg_loss": {"kind": "internal", "energy_weight": 0.5}, "cg_train": {"steps": 3, "batch_size": 16},
            "net": {"hidden": [8]}}
    result = coarse_grain(alanine_md["positions"][:200], alanine_md["topology"], 300.0, tmp_path / "cg.ckpt",
                          "backbone", "flow-matching", options=opts, progress=False)
    assert (tmp_path / "cg.flow.ckpt").exists() and (tmp_path / "cg.flow1.ckpt").exists()
    assert result.info["flow_ensemble"] == 2 and result.info["torsion_jitter_points"] == 32
    assert (tmp_path / "cg.ckpt").exists() and result.info["cg_best_val_loss"] is not None
