"""One battery over every bijection: a new transform joins CASES and gets every check."""
from __future__ import annotations

import io

import pytest
import torch

from openmm_flowforce.bijections import (Compose, Inverse, family_names, get_family, invert_monotone,
                                         smooth_mixture, smooth_step)

B, D, K = 6, 3, 5


pytestmark = pytest.mark.usefixtures("float64")


def _raw(name: str, periodic: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    fam = get_family(name)
    return (1.5 * torch.randn(B, D, fam.n_params(K, periodic), generator=g)).requires_grad_(True)


#: "ispline" is C³ (order-4 M-splines); "ispline-c1" the least smooth I-spline (order 2).
NAMES = ("smooth", "spline", "ispline", "ispline-c1")
CASES = [(name, periodic) for name in NAMES for periodic in (False, True)]
IDS = [f"{n}-{'circle' if p else 'interval'}" for n, p in CASES]


def _build(case, seed=0):
    name, periodic = case
    raw = _raw(name, periodic, seed)
    return raw, get_family(name).build(raw, periodic)


def _points(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, D, generator=g)


def test_registry_lists_both_families_and_rejects_unknown_names():
    assert {"smooth", "spline"} <= set(family_names())
    with pytest.raises(ValueError, match="valid names: .*smooth"):
        get_family("nonsense")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_shape_domain_and_round_trip(case):
    _, bij = _build(case)
    x = _points()
    y, ladj = bij.forward(x)
    assert y.shape == x.shape and ladj.shape == (B,)
    assert bool(((y >= 0) & (y <= 1)).all())
    x_back, ladj_inv = bij.inverse(y)
    assert torch.allclose(x_back, x, atol=1e-10, rtol=0)
    assert torch.allclose(ladj_inv, -ladj, atol=1e-9, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_ladj_matches_autograd_jacobian_both_directions(case):
    raw, _ = _build(case)
    name, periodic = case
    x = _points()
    for b in range(B):
        bij = get_family(name).build(raw[b:b + 1].detach(), periodic)
        jac = torch.autograd.functional.jacobian(lambda v: bij.forward(v)[0], x[b:b + 1])[0, :, 0, :]
        assert torch.allclose(torch.slogdet(jac)[1], bij.forward(x[b:b + 1])[1][0], atol=1e-9)
        y = bij.forward(x[b:b + 1])[0]
        jac_inv = torch.autograd.functional.jacobian(lambda v: bij.inverse(v)[0], y)[0, :, 0, :]
        assert torch.allclose(torch.slogdet(jac_inv)[1], bij.inverse(y)[1][0], atol=1e-8)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_reach_every_parameter_both_directions(case):
    """One parameter set shared by 66 points (broadcast): every raw parameter gets a gradient."""
    name, periodic = case
    x = torch.rand(64, D, generator=torch.Generator().manual_seed(2))
    x = torch.cat([x, torch.zeros(1, D), torch.ones(1, D)])  # the end knots' slopes act only near 0 and 1
    for direction in ("forward", "inverse"):
        raw = _raw(name, periodic, 0)[:1].detach().requires_grad_(True)
        out, ladj = getattr(get_family(name).build(raw, periodic), direction)(x)
        (out.sin().sum() + ladj.sum()).backward()
        assert bool((raw.grad != 0).all()), direction


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_compose_and_inverse_wrappers(case):
    _, f = _build(case, seed=0)
    _, g = _build(case, seed=1)
    x = _points()
    y1, l1 = f.forward(x)
    y2, l2 = g.forward(y1)
    y, ladj = Compose(f, g).forward(x)
    assert torch.equal(y, y2) and torch.allclose(ladj, l1 + l2, atol=1e-14)
    x_back, ladj_back = Inverse(Compose(f, g)).forward(y)
    assert torch.allclose(x_back, x, atol=1e-10) and torch.allclose(ladj_back, -ladj, atol=1e-9)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_identity_raw_is_near_identity(case):
    name, periodic = case
    fam = get_family(name)
    raw = fam.identity_raw(K, periodic).expand(B, D, -1)
    x = _points()
    y, ladj = fam.build(raw, periodic).forward(x)
    # spline and interval I-splines: exact identity; smooth and circle I-splines: identity
    # blend c ≈ 0.99, so slope within 1 ± 0.011
    exact = name == "spline" or (name.startswith("ispline") and not periodic)
    tol = 1e-12 if exact else 0.005
    assert (y - x).abs().max() < tol
    assert (ladj / D).abs().max() < (1e-12 if exact else 0.011)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_save_load_round_trip(case):
    name, periodic = case
    raw, bij = _build(case)
    buffer = io.BytesIO()
    torch.save({"raw": raw.detach()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["raw"]
    x = _points()
    assert torch.equal(get_family(name).build(loaded, periodic).forward(x)[0], bij.forward(x)[0])


def test_float32_round_trip_tolerance():
    fam = get_family("smooth")
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(2000, 4, fam.n_params(8, False), generator=g).float()
    x = torch.rand(2000, 4, generator=g).float()
    bij = fam.build(raw, False)
    y, _ = bij.forward(x)
    x_back, _ = bij.inverse(y)
    assert x_back.dtype == torch.float32
    assert (bij.forward(x_back)[0] - y).abs().max() <= 1e-6


def test_root_finding_inverse_gradcheck_input_and_parameters():
    g = torch.Generator().manual_seed(0)
    n = 5
    a = (0.6 + 3 * torch.rand(n, K, generator=g)).requires_grad_()
    b = torch.rand(n, K, generator=g).requires_grad_()
    w = torch.softmax(torch.randn(n, K, generator=g), -1).requires_grad_()
    c = (0.05 + 0.5 * torch.rand(n, generator=g)).requires_grad_()
    y = torch.rand(n, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(lambda *args: invert_monotone(smooth_mixture, *args), (y, a, b, w, c))


@pytest.mark.parametrize("periodic", [False, True])
def test_smooth_inverse_gradcheck_through_raw_parameters(periodic):
    fam = get_family("smooth")
    raw = _raw("smooth", periodic, 4)[:2, :2]
    y = _points()[:2, :2].requires_grad_()
    assert torch.autograd.gradcheck(lambda r, v: fam.build(r, periodic).inverse(v)[0], (raw, y))
    assert torch.autograd.gradcheck(lambda r, v: fam.build(r, periodic).inverse(v)[1], (raw, y))


def test_smooth_step_is_flat_to_every_order_at_the_ends():
    t = torch.tensor([1e-3, 0.02, 0.98, 1 - 1e-3])
    s, ds = smooth_step(t)
    assert s[0] < 1e-300 and 1 - s[3] < 1e-300  # exp(−1/t) at t = 1e-3 underflows
    assert ds[0] < 1e-15 and ds[3] < 1e-15
    assert torch.equal(smooth_step(torch.tensor([-0.5, 0.0, 1.0, 1.5]))[0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    # σ(t) + σ(1 − t) = 1 by construction
    u = torch.linspace(0.01, 0.99, 50)
    assert torch.allclose(smooth_step(u)[0] + smooth_step(1 - u)[0], torch.ones(50), atol=1e-15)


def _log_slope_derivatives(name, raw, u):
    """log f'(u) and its first two u-derivatives for the inner (unshifted) circle transform."""
    bij = get_family(name).build(raw, True).bijections[1]
    u = u.clone().requires_grad_()
    logd = bij.forward(u)[1]
    d1 = torch.autograd.grad(logd.sum(), u, create_graph=True)[0]
    d2 = torch.autograd.grad(d1.sum(), u)[0]
    return logd.detach(), d1.detach(), d2


def test_circle_transform_is_smooth_across_the_boundary_and_spline_is_not():
    """log f' and its first two derivatives match at u → 0⁺ and u → 1⁻ (smooth, C³ I-spline)."""
    lo, hi = torch.full((B, D), 1e-11), torch.full((B, D), 1 - 1e-11)
    for name in ("smooth", "ispline"):
        raw = _raw(name, True, 5).detach()
        for a, b in zip(_log_slope_derivatives(name, raw, lo), _log_slope_derivatives(name, raw, hi)):
            assert torch.allclose(a, b, atol=1e-5), name
    raw = _raw("spline", True, 5).detach()
    s_lo = _log_slope_derivatives("spline", raw, lo)
    s_hi = _log_slope_derivatives("spline", raw, hi)
    assert torch.allclose(s_lo[0], s_hi[0], atol=1e-5)  # C¹: the density is continuous ...
    assert (s_lo[1] - s_hi[1]).abs().max() > 1e-2       # ... but its derivative (the force) jumps


@pytest.mark.parametrize("periodic", [False, True])
def test_ispline_inverse_gradcheck_through_raw_parameters(periodic):
    fam = get_family("ispline")
    raw = _raw("ispline", periodic, 4)[:2, :2]
    y = _points()[:2, :2].requires_grad_()
    assert torch.autograd.gradcheck(lambda r, v: fam.build(r, periodic).inverse(v)[0], (raw, y))
    assert torch.autograd.gradcheck(lambda r, v: fam.build(r, periodic).inverse(v)[1], (raw, y))


def _derivatives_at(bij, x: torch.Tensor, order: int) -> list[torch.Tensor]:
    """f', f'', … f^(order) at x (1, 1) by autograd of the analytic slope."""
    x = x.clone().requires_grad_()
    d = torch.exp(bij.forward(x)[1])
    out = [d.detach()]
    for _ in range(order - 1):
        (d,) = torch.autograd.grad(d.sum(), x, create_graph=True)
        out.append(d.detach())
    return out


@pytest.mark.parametrize("s", [1, 2, 3, 4])
def test_ispline_cs_is_exactly_cs_at_an_interior_knot(s):
    """f^(1..s) agree on both sides of a knot; f^(s+1) jumps (so the class is C^s, not more)."""
    fam = get_family(f"ispline-c{s}")
    n_components = 7
    raw = torch.randn(1, 1, fam.n_params(n_components, False), generator=torch.Generator().manual_seed(s))
    bij = fam.build(raw, False)
    knot = 1.0 / (n_components - (s + 1) + 1)  # first interior knot of the clamped basis
    left = _derivatives_at(bij, torch.full((1, 1), knot - 1e-9), s + 1)
    right = _derivatives_at(bij, torch.full((1, 1), knot + 1e-9), s + 1)
    for m in range(s):  # f^(m+1)
        assert torch.allclose(left[m], right[m], rtol=1e-5, atol=1e-5), m + 1
    assert (left[s] - right[s]).abs().item() > 1e-2
