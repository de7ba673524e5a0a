"""The robust (Huber) CG force loss, ``cg_loss.huber``: the plain loss below δ, bounded pull
beyond, exact gradients; wired through ``train_cg_net`` for both loss kinds (float64)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("openmm")

from openmm_flowforce.errors import OptionError  # noqa: E402
from openmm_flowforce.training import TrainConfig  # noqa: E402
from openmm_flowforce.training.cg import force_scale_of, huber_per_frame, train_cg_net  # noqa: E402
from openmm_flowforce.training.flow_matching import _options  # noqa: E402
from openmm_flowforce.training.internal_forces import InternalForceLoss, internal_coordinates  # noqa: E402


def test_huber_is_the_plain_loss_below_delta_and_linear_in_the_rms_beyond():
    r = torch.tensor([0.0, 1e-6, 0.3, 0.99, 1.0], dtype=torch.float64)
    assert torch.equal(huber_per_frame(r, 1.0), r)  # exactly, not approximately
    assert huber_per_frame(r, None) is r
    big = torch.tensor([4.0, 100.0, 1e6], dtype=torch.float64)
    np.testing.assert_allclose(huber_per_frame(big, 1.0).numpy(), 2.0 * big.sqrt().numpy() - 1.0, rtol=1e-15)
    np.testing.assert_allclose(huber_per_frame(big, 0.5).numpy(), big.sqrt().numpy() - 0.25, rtol=1e-15)
    # Value and slope are continuous at r = δ² (slope 1 on both sides).
    d = 0.7
    at = torch.tensor([d * d * (1 - 1e-7), d * d * (1 + 1e-7)], dtype=torch.float64, requires_grad=True)
    value = huber_per_frame(at, d)
    (slope,) = torch.autograd.grad(value.sum(), at)
    assert float((value[1] - value[0]).detach()) == pytest.approx(2e-7 * d * d, rel=1e-6)
    np.testing.assert_allclose(slope.numpy(), 1.0, rtol=1e-6)


def test_huber_gradients_are_exact_and_bounded():
    r = torch.tensor([0.01, 0.5, 2.0, 30.0, 4e4], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: huber_per_frame(t, 1.3), (r,))
    assert torch.autograd.gradgradcheck(lambda t: huber_per_frame(t, 1.3), (r,))
    (slope,) = torch.autograd.grad(huber_per_frame(r, 1.3).sum(), r)
    # d/dr (2δ√r − δ²) = δ/√r: the pull of a frame in force units, 2√r · δ/√r = 2δ, is capped.
    np.testing.assert_allclose(slope[2:].numpy(), 1.3 / r[2:].detach().sqrt().numpy(), rtol=1e-14)
    (plain,) = torch.autograd.grad(huber_per_frame(r, None).sum(), r)
    assert torch.equal(plain, torch.ones_like(r))


@pytest.fixture(scope="module")
def backbone(cg, alanine_md):
    _, mapping, _ = cg
    x = torch.as_tensor(mapping.map_positions(alanine_md["positions"][:400]))
    f = torch.as_tensor(mapping.map_forces(alanine_md["forces"][:400]))
    return mapping, x, f


def fresh_net(mapping, x):
    from openmm_flowforce.potentials.cg_net import CGEnergyNet

    torch.manual_seed(0)
    return CGEnergyNet.from_data(mapping, x[:320], 300.0, hidden=(8, 8)).double()


@pytest.mark.parametrize("kind", ["cartesian", "internal"])
def test_train_cg_net_with_a_delta_beyond_every_residual_is_the_plain_fit(backbone, kind):
    mapping, x, f = backbone
    config = TrainConfig(steps=15, batch_size=64, lr=3e-3, validate_every=5)
    results = []
    for huber in (None, 1e6):
        internal = None
        if kind == "internal":
            internal = InternalForceLoss(internal_coordinates(mapping.cg_topology()))
        net = fresh_net(mapping, x)
        fit = train_cg_net(net, x, f, config, val_fraction=0.2, progress=False, internal=internal, huber=huber)
        results.append((fit, [p.detach().clone() for p in net.parameters()]))
    (plain, p_plain), (robust, p_robust) = results
    assert robust.best_val_loss == plain.best_val_loss and robust.initial_val_loss == plain.initial_val_loss
    assert all(torch.equal(a, b) for a, b in zip(p_plain, p_robust))


def test_huber_bounds_the_pull_of_an_outlier_frame(backbone):
    mapping, x, f = backbone
    net = fresh_net(mapping, x).train()
    scale = force_scale_of(f)
    spoiled = f[:64].clone()
    spoiled[0] *= 1e4  # one frame with absurd forces, as at a flow sample in the flow's tail

    def gradient(forces: torch.Tensor, huber: float | None) -> torch.Tensor:
        _, predicted = net.energy_and_forces(x[:64])
        loss = huber_per_frame(((predicted - forces) / scale).pow(2).flatten(1).mean(1), huber).mean()
        grads = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)
        return torch.cat([g.flatten() for g in grads if g is not None])

    clean, plain, robust = gradient(f[:64], 1.0), gradient(spoiled, None), gradient(spoiled, 1.0)
    assert float(plain.norm()) > 1e3 * float(clean.norm())  # one frame decides the plain step
    assert float(robust.norm()) < 10 * float(clean.norm())  # and not the robust one


def test_huber_option_is_checked():
    assert _options({"cg_loss": {"huber": 2.5}})["cg_loss"]["huber"] == 2.5
    # Off by default, and absent: the CG nets cached by earlier runs keep their fingerprint
    # (kind auto is resolved before it is fingerprinted: cartesian for flow-matching, as before).
    assert _options(None)["cg_loss"] == {"kind": "auto", "energy_weight": None}
    for bad in (0.0, -1.0, "x"):
        with pytest.raises(OptionError, match="cg_loss.huber"):
            _options({"cg_loss": {"huber": bad}})
