"""Probability-flow ODE likelihood (samplers/pf_ode.py) against analytic Gaussians, the
Hutchinson estimator against the exact trace, and iDEM's NLL/ESS wiring."""
from __future__ import annotations

import math

import pytest
import torch

from openmm_flowforce.samplers import get_method
from openmm_flowforce.samplers.common import make_target
from openmm_flowforce.samplers.idem import GeometricNoiseSchedule, IDEMModel
from openmm_flowforce.samplers.pf_ode import (ProbabilityFlow, divergence_exact, divergence_hutchinson,
                                              mean_free_basis, subspace_dimension)

SCHEDULE = GeometricNoiseSchedule(0.01, 5.0)


def _gaussian_score(std: torch.Tensor):
    """Exact VE score of N(0, diag std²) noised by the schedule: −z / (std² + σ²(t))."""
    return lambda z, t: -z / (std ** 2 + SCHEDULE.variance(t)[:, None])


def _analytic_log_q(z0: torch.Tensor, std: torch.Tensor, n: int) -> torch.Tensor:
    """The exact push-forward of the prior N(0, σ₁²) by the (linear) flow of a Gaussian: the
    ODE maps z₀ to z₁ = z₀·√((std² + σ₁²)/std²) coordinate-wise, so
    log q(z₀) = log N(z₁; 0, σ₁² I_n) + Σ log √((std² + σ₁²)/std²) (n terms)."""
    var1 = float(SCHEDULE.variance(torch.tensor(1.0, dtype=torch.float64)))
    scale = ((std ** 2 + var1) / std ** 2).sqrt()
    z1 = z0 * scale
    log_det = scale.log().sum() if std.numel() > 1 else n * scale.log()
    return -0.5 * (z1.pow(2).sum(-1) / var1 + n * math.log(2 * math.pi * var1)) + log_det


def test_mean_free_basis_is_orthonormal_and_spans_the_zero_com_subspace():
    q = mean_free_basis(8, (4, 2))
    assert q.shape == (8, 6) and subspace_dimension(8, (4, 2)) == 6 and subspace_dimension(39, (13, 3)) == 36
    torch.testing.assert_close(q.T @ q, torch.eye(6, dtype=torch.float64), atol=1e-12, rtol=0)
    centre = q.reshape(4, 2, 6).sum(0)  # every basis vector has zero centre of mass
    assert centre.abs().max() < 1e-12
    projector = torch.eye(8, dtype=torch.float64) - torch.kron(torch.ones(4, 4, dtype=torch.float64) / 4,
                                                               torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(q @ q.T, projector, atol=1e-12, rtol=0)


def test_ode_log_prob_of_an_anisotropic_gaussian_matches_the_analytic_density():
    """Vector target N(0, diag(0.5, 1, 2)²), exact score: ODE log q = analytic to 1e-6 (RK4, 200 steps)."""
    std = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    flow = ProbabilityFlow(_gaussian_score(std), SCHEDULE, 3, None, steps=200)
    z0 = torch.randn(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * std
    log_q = flow.log_prob(z0)
    torch.testing.assert_close(log_q, _analytic_log_q(z0, std, 3), atol=1e-6, rtol=0)
    # Samples by the same ODE backwards carry the same log q (analytic at their end point).
    x, log_q_x = flow.sample(50, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(log_q_x, _analytic_log_q(x, std, 3), atol=1e-6, rtol=0)
    assert 0.35 < float(x[:, 0].std()) < 0.65 and 1.5 < float(x[:, 2].std()) < 2.5


def test_ode_log_prob_on_the_zero_com_subspace_counts_n_minus_one_particles():
    """4 particles in 2-D, isotropic Gaussian on the mean-free subspace: the density has
    dimension (N − 1)·d = 6, and the exact divergence the trace restricted to it."""
    std = torch.tensor(0.8, dtype=torch.float64)
    flow = ProbabilityFlow(_gaussian_score(std), SCHEDULE, 8, (4, 2), steps=200)
    assert flow.n == 6
    z0 = make_target("dw4").remove_mean(torch.randn(30, 8, dtype=torch.float64,
                                                    generator=torch.Generator().manual_seed(2)) * std)
    torch.testing.assert_close(flow.log_prob(z0), _analytic_log_q(z0, std, 6), atol=1e-6, rtol=0)


def test_hutchinson_trace_within_its_stated_error():
    """Linear field f = A z on the mean-free subspace of 4×2: the exact restricted trace is
    tr(P A P); the mean of M Rademacher probes agrees within 4 standard errors, the standard
    error being √(2(‖C‖_F² − Σ C_ii²)/M) with C = sym(PAP) (pf_ode's docstring)."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(8, 8, dtype=torch.float64, generator=g)
    q = mean_free_basis(8, (4, 2))
    p = q @ q.T
    z = torch.zeros(1, 8, dtype=torch.float64)
    field = lambda y: y @ (p @ a @ p).T  # noqa: E731 - the field's Jacobian is PAP
    _, exact = divergence_exact(field, z, q)
    assert float(exact) == pytest.approx(float(torch.trace(p @ a @ p)), abs=1e-12)
    c = 0.5 * (p @ a @ p + (p @ a @ p).T)
    std_one = math.sqrt(2 * (float(c.pow(2).sum()) - float(torch.diagonal(c).pow(2).sum())))
    m = 4000
    signs = torch.randint(0, 2, (m, 1, 8), generator=g).double() * 2 - 1
    _, estimate = divergence_hutchinson(field, z, q, signs @ p)
    assert abs(float(estimate - exact)) < 4 * std_one / math.sqrt(m), (float(estimate), float(exact))
    # One probe at a time scatters with the stated standard deviation (within 10 %).
    singles = torch.stack([divergence_hutchinson(field, z, q, (signs[i:i + 1] @ p))[1] for i in range(400)])
    assert float(singles.std()) == pytest.approx(std_one, rel=0.1)


def test_hutchinson_log_prob_is_unbiased_for_the_exact_one():
    """The Hutchinson ODE log q of a particle Gaussian scatters around the exact one; the
    mean of 400 independent one-probe estimates is within 4 standard errors of it."""
    std = torch.tensor(0.8, dtype=torch.float64)
    z0 = make_target("dw4").remove_mean(torch.randn(1, 8, dtype=torch.float64,
                                                    generator=torch.Generator().manual_seed(4)) * std)
    exact = ProbabilityFlow(_gaussian_score(std), SCHEDULE, 8, (4, 2), steps=40).log_prob(z0)
    hutch = ProbabilityFlow(_gaussian_score(std), SCHEDULE, 8, (4, 2), steps=40, divergence="hutchinson")
    estimates = hutch.log_prob(z0.expand(400, 8), generator=torch.Generator().manual_seed(5))
    spread = float(estimates.std())
    assert spread > 0.05  # the estimator is random here (PJP is not diagonal) ...
    assert abs(float(estimates.mean() - exact)) < 4 * spread / math.sqrt(400)  # ... and unbiased


def test_idem_log_prob_is_normalised_and_matches_its_ode_samples():
    """An untrained iDEM MLP (2-D, data_scale 2): q integrates to 1 on a grid, and samples
    drawn by the ODE carry the log q that the forward ODE gives them."""
    torch.manual_seed(0)
    model = IDEMModel(2, None, "mlp", 16, 2, sigma_min=0.01, sigma_max=1.5, data_scale=2.0, ode_steps=20).double()
    edges = torch.linspace(-10.0, 10.0, 61, dtype=torch.float64)
    centres = 0.5 * (edges[1:] + edges[:-1])
    grid = torch.cartesian_prod(centres, centres)
    mass = float(model.log_prob(grid).exp().sum() * (edges[1] - edges[0]) ** 2)
    assert mass == pytest.approx(1.0, abs=0.01)
    x, log_q = model.sample_with_log_prob(200, torch.Generator().manual_seed(6))
    torch.testing.assert_close(model.log_prob(x), log_q, atol=2e-4, rtol=0)


def test_idem_method_reports_nll_and_ess_from_the_ode():
    from openmm_flowforce.analysis.sampler_report import evaluate_sampler

    target = make_target("dw4")
    method = get_method("idem")
    options = method.options(dict(hidden=8, n_layers=2, ode_steps=5, integration_steps=10))
    model = method.build(target, options).double()
    reference = target.remove_mean(torch.randn(40, 8, dtype=torch.float64,
                                               generator=torch.Generator().manual_seed(7)) * 2).numpy()
    report = evaluate_sampler(method, model, target, reference, align=False)
    expected_nll = -float(method.log_prob(model, torch.as_tensor(reference)).mean())
    assert report["nll"] == pytest.approx(expected_nll, rel=1e-10)
    assert 0.0 < report["ess"] <= 1.0
    with pytest.raises(ValueError, match="divergence.*exact, hutchinson"):
        method.options({"divergence": "skilling"})
