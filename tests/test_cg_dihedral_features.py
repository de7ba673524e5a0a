"""Weighted dihedral features of the MLP CG net (``net.dihedral_features: weighted``): they are
``sin θ₁ sin θ₂ (cos φ, sin φ)``, stay smooth where a bonded angle turns linear (where
``(cos φ, sin φ)`` makes forces diverge), and the net built on them is a correct, invariant,
scriptable, saveable energy (float64)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

pytest.importorskip("openmm")

from openmm_flowforce.errors import OptionError  # noqa: E402
from openmm_flowforce.potentials.cg_net import CGEnergyNet  # noqa: E402
from openmm_flowforce.potentials.priors import (cos_angles, dihedral_angles, dihedral_cos_sin,  # noqa: E402
                                                dihedral_cos_sin_weighted)
from openmm_flowforce.training.flow_matching import _options, build_cg_net  # noqa: E402

QUAD = torch.tensor([[0, 1, 2, 3]])


def chain(batch: int, seed: int = 0) -> torch.Tensor:
    """Random 4-bead chains ``(B, 4, 3)`` nm with bonds of 0.38 nm."""
    gen = torch.Generator().manual_seed(seed)
    steps = torch.randn(batch, 3, 3, dtype=torch.float64, generator=gen)
    steps = 0.38 * steps / steps.norm(dim=-1, keepdim=True)
    return torch.cat([torch.zeros(batch, 1, 3, dtype=torch.float64), steps.cumsum(1)], dim=1)


def test_weighted_features_are_the_sines_times_cos_and_sin_of_the_dihedral():
    x = chain(50)
    cos, sin = dihedral_cos_sin_weighted(x, QUAD)
    phi = dihedral_angles(x, QUAD)
    first, second = cos_angles(x, torch.tensor([[0, 1, 2]])), cos_angles(x, torch.tensor([[1, 2, 3]]))
    sines = (1 - first ** 2).sqrt() * (1 - second ** 2).sqrt()
    np.testing.assert_allclose(cos.numpy(), (sines * torch.cos(phi)).numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(sin.numpy(), (sines * torch.sin(phi)).numpy(), rtol=1e-12, atol=1e-14)


def linear_at(epsilon: float) -> torch.Tensor:
    """A chain whose first angle is π − ε (beads 0, 1, 2 nearly on a line)."""
    x = torch.tensor([[[0.0, 0.0, 0.0], [0.38, 0.0, 0.0], [0.76, 0.0, 0.0], [0.9, 0.35, 0.05]]], dtype=torch.float64)
    x[0, 0, 1] = 0.38 * np.tan(epsilon)  # turns the angle at bead 1 by ~ε away from π
    return x


def gradient_norm(features, x: torch.Tensor) -> float:
    x = x.clone().requires_grad_(True)
    cos, sin = features(x, QUAD)
    (grad,) = torch.autograd.grad((cos + 0.7 * sin).sum(), x)
    return float(grad.norm())


def test_weighted_features_stay_smooth_where_an_angle_turns_linear():
    # (cos φ, sin φ): the gradient grows as 1/sin θ (×10 per decade of ε); weighted: bounded.
    plain = [gradient_norm(dihedral_cos_sin, linear_at(eps)) for eps in (1e-2, 1e-3, 1e-4)]
    weighted = [gradient_norm(dihedral_cos_sin_weighted, linear_at(eps)) for eps in (1e-2, 1e-3, 1e-4)]
    assert plain[1] / plain[0] == pytest.approx(10.0, rel=0.05) and plain[2] / plain[1] == pytest.approx(10.0, rel=0.05)
    assert max(weighted) < 10.0 and max(weighted) / min(weighted) < 1.05  # ~1/b, b = 0.38 nm
    exact = linear_at(0.0)
    cos, sin = dihedral_cos_sin_weighted(exact, QUAD)
    assert float(cos.abs()) < 1e-15 and float(sin.abs()) < 1e-15  # no information, no NaN
    assert np.isfinite(gradient_norm(dihedral_cos_sin_weighted, exact))
    near = linear_at(1e-3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: torch.cat(dihedral_cos_sin_weighted(t, QUAD), -1), (near,))
    assert torch.autograd.gradgradcheck(lambda t: torch.cat(dihedral_cos_sin_weighted(t, QUAD), -1), (near,))


@pytest.fixture(scope="module")
def weighted_net(cg, alanine_md):
    _, mapping, _ = cg
    x = torch.as_tensor(mapping.map_positions(alanine_md["positions"][:600]))
    torch.manual_seed(0)
    net = CGEnergyNet.from_data(mapping, x, 300.0, hidden=(16, 16), dihedral_features="weighted").double()
    torch.nn.init.normal_(net.network[-1].weight, std=0.5)
    return net.eval(), mapping, x


def test_weighted_net_forces_invariance_chirality(weighted_net):
    net, _, x = weighted_net
    x = x[::60]
    energy, forces = net.energy_and_forces(x)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        direction = torch.randn(x.shape, dtype=torch.float64, generator=gen)
        direction /= direction.flatten(1).norm(dim=1)[:, None, None]
        with torch.no_grad():
            numeric = (net(x + 1e-6 * direction) - net(x - 1e-6 * direction)) / 2e-6
        np.testing.assert_allclose(numeric.numpy(), -(forces * direction).flatten(1).sum(1).detach().numpy(), rtol=1e-6)
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=gen))
    rotation = q if torch.det(q) > 0 else -q
    moved_energy, moved_forces = net.energy_and_forces(x @ rotation.T + 0.7)
    np.testing.assert_allclose(moved_energy.detach().numpy(), energy.detach().numpy(), rtol=1e-10)
    np.testing.assert_allclose(moved_forces.detach().numpy(), (forces @ rotation.T).detach().numpy(),
                               atol=1e-10 * float(forces.abs().max()))
    # A mirror image flips the sign of sin φ: the net still tells the two hands apart.
    mirrored = net(x * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
    assert float((mirrored - energy).abs().max().detach()) > 1e-3


@pytest.mark.filterwarnings(r"ignore:.*torch\.jit\.\w+. is deprecated:DeprecationWarning")
def test_weighted_net_scripts_saves_and_old_configs_stay_cos_sin(weighted_net):
    net, _, x = weighted_net
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(net), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    e, f = net.energy_and_forces(x[:9])
    e_s, f_s = loaded.energy_and_forces(x[:9])
    np.testing.assert_allclose(e_s.detach().numpy(), e.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(f_s.detach().numpy(), f.detach().numpy(), rtol=1e-12, atol=1e-9)
    config = json.loads(json.dumps(net.config()))
    assert config["dihedral_features"] == "weighted"
    rebuilt = CGEnergyNet.from_config(config).double()
    rebuilt.load_state_dict(net.state_dict())
    np.testing.assert_allclose(rebuilt(x[:9]).detach().numpy(), e.detach().numpy(), rtol=1e-14)
    old = {k: v for k, v in config.items() if k != "dihedral_features"}  # a model file from before the choice
    assert not CGEnergyNet.from_config(old).features.weighted


def test_dihedral_features_option(cg, alanine_md):
    _, mapping, _ = cg
    x = np.asarray(mapping.map_positions(alanine_md["positions"][:200]))
    opts = _options({"net": {"dihedral_features": "weighted", "hidden": [8]}})
    assert build_cg_net(mapping, x, 300.0, opts["net"]).features.weighted
    assert not build_cg_net(mapping, x, 300.0, _options(None)["net"]).features.weighted
    with pytest.raises(OptionError, match="dihedral_features"):
        _options({"net": {"dihedral_features": "sin"}})


def test_the_readme_protein_config_is_valid():
    """The chignolin config in README.md ("Flow-matching for a protein") passes the option checks."""
    import re
    from pathlib import Path

    import yaml

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, flags=re.S) if "cln025_cg.yaml" in b)
    opts = _options(yaml.safe_load(block))
    assert opts["net"]["dihedral_features"] == "weighted" and opts["contact_factor"] == 1.0
