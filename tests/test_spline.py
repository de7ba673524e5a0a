"""Tests for the rational-quadratic spline (arXiv:1906.04032) and its circular version."""
from __future__ import annotations

import pytest
import torch

from openmm_flowforce.bijections.base import get_family
from openmm_flowforce.bijections.spline import RationalQuadraticSpline, SplineFamily

B, D, K = 64, 3, 8


pytestmark = pytest.mark.usefixtures("float64")


def random_raw(periodic: bool, batch: int = B, scale: float = 2.0) -> torch.Tensor:
    """Raw parameters far enough from identity that bins and derivatives differ a lot."""
    family = SplineFamily()
    return scale * torch.randn(batch, D, family.n_params(K, periodic))


def circular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    diff = torch.remainder(a - b, 1.0)
    return torch.minimum(diff, 1.0 - diff)


@pytest.mark.parametrize("periodic", [False, True])
def test_registered_and_param_count(periodic):
    family = get_family("spline")
    assert isinstance(family, SplineFamily)
    assert family.n_params(K, periodic) == 3 * K + 1
    with pytest.raises(ValueError, match="3K \\+ 1"):
        family.build(torch.zeros(2, D, 3 * K), periodic)


@pytest.mark.parametrize("periodic", [False, True])
def test_round_trip_and_inverse_ladj(periodic):
    bij = SplineFamily().build(random_raw(periodic), periodic)
    x = torch.rand(B, D)
    y, ladj = bij.forward(x)
    assert y.shape == (B, D) and ladj.shape == (B,)
    x_back, ladj_inv = bij.inverse(y)
    err = circular_distance(x_back, x) if periodic else (x_back - x).abs()
    assert err.max() < 1e-10
    # The log-slope varies by up to ~1e6 per unit x in MIN_BIN-wide bins, so the ~1e-11
    # round-trip error in x shows up as ~1e-10 in ladj (seen over 20 seeds); 1e-8 bounds it.
    torch.testing.assert_close(ladj_inv, -ladj, rtol=0, atol=1e-8)


@pytest.mark.parametrize("periodic", [False, True])
def test_ladj_matches_autograd_jacobian(periodic):
    raw = random_raw(periodic, batch=4)
    x = torch.rand(4, D)
    _, ladj = SplineFamily().build(raw, periodic).forward(x)
    for i in range(4):
        row = SplineFamily().build(raw[i : i + 1], periodic)
        # Full Jacobian, so off-diagonal terms (which must vanish) are checked too.
        jac = torch.autograd.functional.jacobian(lambda xi: row.forward(xi.unsqueeze(0))[0][0], x[i])
        torch.testing.assert_close(torch.linalg.slogdet(jac).logabsdet, ladj[i], rtol=0, atol=1e-8)
        torch.testing.assert_close(jac, torch.diag(torch.diagonal(jac)), rtol=0, atol=0)


def test_inverse_ladj_matches_autograd():
    bij = SplineFamily().build(random_raw(False), False)
    y = torch.rand(B, D, requires_grad=True)
    x, ladj = bij.inverse(y)
    (dxdy,) = torch.autograd.grad(x.sum(), y)
    torch.testing.assert_close(dxdy.log().sum(-1), ladj, rtol=0, atol=1e-8)


@pytest.mark.parametrize("periodic", [False, True])
def test_identity_raw_is_identity(periodic):
    family = SplineFamily()
    raw = family.identity_raw(K, periodic).expand(B, D, -1)
    bij = family.build(raw, periodic)
    x = torch.cat([torch.rand(B - 2, D), torch.zeros(1, D), torch.full((1, D), 0.999)])
    y, ladj = bij.forward(x)
    torch.testing.assert_close(y, x, rtol=0, atol=1e-14)
    torch.testing.assert_close(ladj, torch.zeros(B), rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_endpoints_and_range(dtype):
    family = SplineFamily()
    spline = family.build(random_raw(False).to(dtype), False)
    x = torch.rand(B, D, dtype=dtype)
    x[0], x[1] = 0.0, 1.0
    y, ladj = spline.forward(x)
    assert y.dtype == dtype and torch.isfinite(ladj).all()
    assert (y >= 0).all() and (y <= 1).all()
    eps = torch.finfo(dtype).eps
    assert (y[0] == 0).all() and (1 - y[1]).max() <= 4 * eps
    x_back, ladj_inv = spline.inverse(y)
    assert (x_back >= 0).all() and (x_back <= 1).all() and torch.isfinite(ladj_inv).all()
    # The quadratic root at the end knots is exact only up to rounding.
    assert x_back[0].max() <= 4 * eps and (1 - x_back[1]).max() <= 1e3 * eps
    # Flat bins (slope down to ~1e-4 here) amplify the rounding of y in x, so in float32
    # the meaningful check is the backward error: forward(inverse(y)) reproduces y.
    y_again, _ = spline.forward(x_back)
    assert (y_again - y).abs().max() <= 8 * eps
    if dtype == torch.float64:
        assert (x_back - x).abs().max() < 1e-10

    circle = family.build(random_raw(True).to(dtype), True)
    y, _ = circle.forward(x)
    assert (y >= 0).all() and (y <= 1).all()


def test_end_derivatives_are_the_knot_derivatives():
    # At ξ = 0 and ξ = 1 the RQ slope equals the knot derivative.
    widths = torch.softmax(torch.randn(1, 1, K), -1)
    heights = torch.softmax(torch.randn(1, 1, K), -1)
    derivatives = torch.rand(1, 1, K + 1) + 0.1
    spline = RationalQuadraticSpline(widths, heights, derivatives)
    _, ladj0 = spline.forward(torch.zeros(1, 1))
    _, ladj1 = spline.forward(torch.ones(1, 1))
    torch.testing.assert_close(ladj0, derivatives[0, :, 0].log())
    torch.testing.assert_close(ladj1, derivatives[0, :, -1].log())


def test_periodic_spline_is_c1_at_the_ends():
    circle = SplineFamily().build(random_raw(True, batch=1), True)
    spline = circle.bijections[1]
    ends = torch.tensor([[0.0] * D, [1.0] * D])
    y, _ = spline.forward(ends)
    torch.testing.assert_close(y, ends, rtol=0, atol=0)
    # Per-dimension log-derivative at both ends via D separate 1-D evaluations.
    x = ends.clone().requires_grad_(True)
    y, _ = spline.forward(x)
    (dydx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(dydx[0], dydx[1], rtol=1e-12, atol=0)
    assert (dydx[0] - 1.0).abs().min() > 1e-3  # non-trivial derivative, so the check has teeth


def test_periodic_map_is_c1_across_the_wrap_point():
    raw = random_raw(True, batch=1)
    circle = SplineFamily().build(raw, True)
    shift = circle.bijections[0].shift  # (1, D)
    wrap = 1.0 - shift  # where (x + shift) mod 1 jumps from 1 to 0
    # Random raw parameters give bins as narrow as MIN_BIN = 1e-3 and log-slopes changing by
    # ~1e6 per unit x, so eps must be tiny for the O(eps) change of a C¹ map's slope to vanish.
    eps = 1e-12
    x = torch.cat([wrap - eps, wrap + eps]).requires_grad_(True)
    y, _ = circle.forward(x)
    assert circular_distance(y[0], y[1]).max() < 1e-9
    (dydx,) = torch.autograd.grad(y.sum(), x)
    log_slope = dydx.log()
    torch.testing.assert_close(log_slope[0], log_slope[1], rtol=0, atol=1e-5)
    # Both one-sided limits are the shared end-knot derivative.
    end_derivative = circle.bijections[1].derivatives[0, :, 0]
    torch.testing.assert_close(log_slope[0], end_derivative.log(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("periodic", [False, True])
def test_gradients_reach_every_parameter(periodic):
    # One parameter set shared by a batch, so every bin and knot is visited.
    raw = random_raw(periodic, batch=1).requires_grad_(True)
    bij = SplineFamily().build(raw, periodic)
    x = torch.linspace(0.0, 1.0, 257).unsqueeze(-1).expand(-1, D).contiguous().requires_grad_(True)
    y, ladj = bij.forward(x)
    z, ladj_inv = bij.inverse(torch.rand(257, D))
    (y.square().sum() + ladj.sum() + z.square().sum() + ladj_inv.sum()).backward()
    assert raw.grad is not None and (raw.grad != 0).all()
    assert x.grad is not None and (x.grad != 0).all()


@pytest.mark.parametrize("periodic", [False, True])
def test_gradgradcheck(periodic):
    # Few bins and dimensions: gradgradcheck costs one backward pass per input element.
    n_bins = 3
    raw = 2.0 * torch.randn(1, 2, SplineFamily().n_params(n_bins, periodic))
    raw.requires_grad_(True)
    x = torch.rand(1, 2, requires_grad=True)

    def f(x: torch.Tensor, raw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        bij = SplineFamily().build(raw, periodic)
        y, ladj = bij.forward(x)
        x_back, ladj_inv = bij.inverse(y)
        return y, ladj, x_back, ladj_inv

    assert torch.autograd.gradcheck(f, (x, raw))
    assert torch.autograd.gradgradcheck(f, (x, raw))


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match="K\\+1"):
        RationalQuadraticSpline(torch.ones(1, 1, 4) / 4, torch.ones(1, 1, 4) / 4, torch.ones(1, 1, 4))
    with pytest.raises(ValueError, match="bins"):
        SplineFamily().n_params(0, False)
