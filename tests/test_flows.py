"""Coupling flows: the battery (round trip, ladj, gradients, save/load), periodic
smoothness, normalisation."""
from __future__ import annotations

import io

import pytest
import torch

from openmm_flowforce.flows import CouplingFlow

PERIODIC = [True, False, True, False, False]


pytestmark = pytest.mark.usefixtures("float64")


def _flow(transform: str, periodic=PERIODIC, scale: float = 3.0, **kw) -> CouplingFlow:
    torch.manual_seed(1)
    flow = CouplingFlow(periodic, transform=transform, n_layers=4, hidden=16, n_components=4,
                        identity_init=False, **kw)
    with torch.no_grad():  # make the map far from the identity
        for p in flow.parameters():
            p.mul_(scale)
    return flow


TRANSFORMS = ["smooth", "spline", "ispline"]


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_round_trip_and_ladj_against_autograd(transform):
    flow = _flow(transform)
    x = torch.rand(8, len(PERIODIC))
    z, ladj = flow.to_latent(x)
    assert z.shape == x.shape and ladj.shape == (8,)
    x_back, ladj_inv = flow.to_data(z)
    assert torch.allclose(x_back, x, atol=1e-9)
    assert torch.allclose(ladj_inv, -ladj, atol=1e-7)
    for b in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: flow.to_latent(v)[0], x[b:b + 1])[0, :, 0, :]
        assert torch.allclose(torch.slogdet(jac)[1], ladj[b], atol=1e-8)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_sample_and_log_prob_agree_with_log_prob(transform):
    flow = _flow(transform)
    x, log_q = flow.sample_and_log_prob(64)
    assert x.shape == (64, len(PERIODIC)) and bool(((x >= 0) & (x <= 1)).all())
    assert torch.allclose(log_q, flow.log_prob(x), atol=1e-7)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_gradients_reach_every_parameter_through_density_and_sampling(transform):
    flow = _flow(transform)
    flow.log_prob(torch.rand(32, len(PERIODIC))).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.parameters())
    flow.zero_grad()
    x, log_q = flow.sample_and_log_prob(32)
    (x.sum() + log_q.sum()).backward()  # through the root-finding inverse
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.parameters())


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_state_dict_save_load_round_trip(transform):
    flow = _flow(transform)
    buffer = io.BytesIO()
    torch.save({"config": flow.config, "state": flow.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    clone = CouplingFlow(**saved["config"])
    clone.load_state_dict(saved["state"])
    x = torch.rand(8, len(PERIODIC))
    assert torch.equal(clone.log_prob(x), flow.log_prob(x))


def test_identity_init_gives_near_uniform_density():
    flow = CouplingFlow(PERIODIC)
    x = torch.rand(100, len(PERIODIC))
    assert flow.log_prob(x).abs().max() < 0.5


def test_one_dimensional_flow_and_input_errors():
    flow = CouplingFlow([True])
    assert flow.sample(5).shape == (5, 1)
    with pytest.raises(ValueError, match=r"shape \(batch, 1\)"):
        flow.log_prob(torch.rand(5, 2))
    with pytest.raises(ValueError, match="valid names"):
        CouplingFlow([True], transform="affine")
    with pytest.raises(ValueError, match="at least one dimension"):
        CouplingFlow([])


def _logq_and_derivatives(flow, x, dim):
    x = x.clone().requires_grad_(True)
    log_q = flow.log_prob(x)
    g = torch.autograd.grad(log_q.sum(), x, create_graph=True)[0]
    h = torch.autograd.grad(g[:, dim].sum(), x)[0]
    return log_q.detach(), g.detach(), h


def test_periodic_density_is_smooth_across_the_data_boundary():
    """log q, its gradient and Hessian row agree at φ = 0 and φ = 1 for every periodic dim."""
    flow = _flow("smooth")
    x = torch.rand(6, len(PERIODIC))
    for dim in (0, 2):
        at0, at1 = x.clone(), x.clone()
        at0[:, dim], at1[:, dim] = 0.0, 1.0
        for a, b in zip(_logq_and_derivatives(flow, at0, dim), _logq_and_derivatives(flow, at1, dim)):
            assert torch.allclose(a, b, atol=1e-8, rtol=1e-8)


def _wrap_point_derivatives(transform):
    """d/dφ log q just below and above the point where a 1-D circle flow's inner map wraps."""
    torch.manual_seed(3)
    flow = CouplingFlow([True], transform=transform, n_layers=1, hidden=4, n_components=4, identity_init=False)
    with torch.no_grad():
        for p in flow.parameters():
            p.mul_(4.0)
        raw = flow.layers[0].conditioner(torch.ones(1, 1)) + flow.layers[0].raw_offset
    shift = float(torch.remainder(raw[0, -1], 1.0))
    wrap = 1.0 - shift
    out = []
    for x in (wrap - 1e-11, wrap + 1e-11):
        xs = torch.tensor([[x % 1.0]], requires_grad=True)
        g = torch.autograd.grad(flow.log_prob(xs).sum(), xs)[0]
        out.append(float(g))
    return out


def test_smooth_flow_forces_are_continuous_where_the_spline_flow_forces_jump():
    for transform in ("smooth", "ispline"):  # C∞ and C³: the forces are continuous across the wrap
        below, above = _wrap_point_derivatives(transform)
        assert abs(below - above) < 1e-5 * max(1.0, abs(below)), transform
    below, above = _wrap_point_derivatives("spline")
    assert abs(below - above) > 1e-2


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_density_integrates_to_one_on_a_grid(transform):
    # scale 1: random but not so sharp that a 400² grid cannot resolve the density
    flow = _flow(transform, periodic=[True, False], scale=1.0)
    n = 400
    centres = (torch.arange(n) + 0.5) / n
    grid = torch.cartesian_prod(centres, centres)
    with torch.no_grad():
        total = flow.log_prob(grid).exp().sum() / n ** 2
    assert abs(float(total) - 1.0) < 2e-3
