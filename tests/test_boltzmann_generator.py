"""Boltzmann generator of alanine dipeptide: internal coordinates + smooth flow, trained
on short MD positions (and forces)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from openmm_flowforce.conventions import kT
from openmm_flowforce.potentials import BoltzmannGenerator, load_boltzmann_generator
from openmm_flowforce.training import TrainConfig, Trainer, flow_forces


pytestmark = pytest.mark.usefixtures("float64")


def _random_rotation(seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed)))
    return q * torch.sign(torch.linalg.det(q))


@pytest.fixture(scope="module")
def trained(alanine_md, tmp_path_factory):
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    x = torch.as_tensor(alanine_md["positions"])
    train, val = x[:1200], x[1200:]
    bg = BoltzmannGenerator.from_topology(alanine_md["topology"], train.numpy(), n_layers=4, hidden=64,
                                          n_components=6)
    ckpt = tmp_path_factory.mktemp("bg") / "bg.ckpt"
    trainer = Trainer(bg, {"nll": 1.0}, data={"x": train}, val_data={"x": val},
                      config=TrainConfig(steps=300, batch_size=128, lr=3e-3, validate_every=50),
                      checkpoint=ckpt, metadata=bg.metadata())
    with torch.no_grad():
        start = trainer.validation_nll()
    trainer.run()
    return bg, ckpt, start, trainer.best_val


def test_training_lowers_validation_nll(trained):
    _, _, start, best = trained
    # The start is already the product of fitted Gaussian marginals in bonds, cos θ and
    # narrow torsions (≈ −216.5 nats); the flow adds correlations and non-Gaussian shapes.
    assert best < start - 0.3, (start, best)


def test_density_is_invariant_to_rigid_motions_and_finite(trained, alanine_md):
    bg, *_ = trained
    x = torch.as_tensor(alanine_md["positions"][:5])
    moved = x @ _random_rotation(1).T + torch.tensor([0.3, -1.2, 2.0])
    with torch.no_grad():
        assert torch.allclose(bg.log_prob(moved), bg.log_prob(x), atol=1e-8)
        assert bool(torch.isfinite(bg.energy(x, 300.0)).all())


def test_samples_have_consistent_log_prob_and_sane_bonds(trained, alanine_md):
    bg, *_ = trained
    with torch.no_grad():
        x, log_q = bg.sample_and_log_prob(200)
        assert x.shape == (200, 22, 3)
        assert torch.allclose(log_q, bg.log_prob(x), atol=1e-6)
    ref = torch.as_tensor(alanine_md["positions"])
    bonds = bg.coordinates.to_internal(x)[0]
    ref_bonds = bg.coordinates.to_internal(ref)[0]
    # sampled bond lengths sit in the data's range (to 0.01 nm) for 99% of samples
    inside = ((bonds > ref_bonds.min(0).values - 0.01) & (bonds < ref_bonds.max(0).values + 0.01)).all(1)
    assert inside.double().mean() > 0.99


def test_forces_match_finite_differences(trained, alanine_md):
    bg, *_ = trained
    x = torch.as_tensor(alanine_md["positions"][:1])
    log_q, f = flow_forces(bg, x)
    energy = lambda y: float(bg.energy(y, 300.0).detach())
    forces = kT(300.0) * f  # kJ/mol/nm
    direction = forces / forces.norm()
    h = 1e-6
    d_energy = (energy(x + h * direction) - energy(x - h * direction)) / (2 * h)
    assert abs(d_energy + float(forces.norm())) < 1e-5 * float(forces.norm())


def test_checkpoint_is_a_self_contained_model_file(trained, alanine_md):
    bg, ckpt, *_ = trained
    loaded = load_boltzmann_generator(ckpt)
    x = torch.as_tensor(alanine_md["positions"][:10])
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(x), bg.log_prob(x))


def test_force_matching_on_cartesian_forces_runs_and_improves(trained, alanine_md):
    bg, ckpt, *_ = trained
    model = load_boltzmann_generator(ckpt)
    x = torch.as_tensor(alanine_md["positions"][:1200])
    reduced = torch.as_tensor(alanine_md["forces"][:1200]) / kT(300.0)

    def error():
        return float((flow_forces(model, x[:300])[1] - reduced[:300]).pow(2).mean())

    before = error()
    Trainer(model, {"nll": 1.0, "force": 0.01}, data={"x": x, "forces": reduced},
            config=TrainConfig(steps=40, batch_size=64, lr=1e-3, validate_every=0)).run()
    assert error() < before
