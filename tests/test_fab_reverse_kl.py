"""Real-space flow, HMC/AIS, FAB and reverse-KL samplers: exactness on Gaussians, quick
training on GMM-40 beating the initial flow, exact checkpoint resume, energy counts."""
from __future__ import annotations

import json
import math

import pytest
import torch

from openmm_flowforce.analysis.metrics import ess, log_partition
from openmm_flowforce.flows import RealFlow, helmert_basis
from openmm_flowforce.samplers import get_method, method_names
from openmm_flowforce.samplers.ais import PointState, annealed_importance_sampling, beta_schedule, hmc_step
from openmm_flowforce.samplers.buffer import PrioritisedBuffer
from openmm_flowforce.targets import get_target

SMALL_FLOW = dict(n_layers=4, hidden=32, n_components=8)




def _scrambled(flow: RealFlow, scale: float = 1.0) -> RealFlow:
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn_like(p) * 0.3)
    return flow


# -- the flow on ℝ^D ---------------------------------------------------------------------------
def test_identity_cube_flow_is_exactly_gaussian(float64):
    flow = RealFlow(3, scale=2.5, transform="spline", identity_init=True)
    x = 4.0 * torch.randn(50, 3)
    expected = torch.distributions.Normal(0.0, 2.5).log_prob(x).sum(-1)
    assert torch.allclose(flow.log_prob(x), expected, atol=1e-12, rtol=0)
    samples, log_q = flow.sample_and_log_prob(20000)
    assert torch.allclose(log_q, torch.distributions.Normal(0.0, 2.5).log_prob(samples).sum(-1), atol=1e-10)
    assert abs(float(samples.detach().std()) - 2.5) < 0.03


def test_identity_mean_free_flow_is_gaussian_on_the_hyperplane(float64):
    n, d, s = 4, 2, 1.7
    basis = helmert_basis(n)
    assert torch.allclose(basis @ basis.T, torch.eye(n - 1), atol=1e-14)
    assert torch.allclose(basis.sum(1), torch.zeros(n - 1), atol=1e-14)
    flow = RealFlow(n * d, scale=s, n_particles=n, spatial_dim=d, transform="spline")
    x = flow.sample(64)
    assert torch.allclose(x.reshape(64, n, d).mean(1), torch.zeros(64, d), atol=1e-12)
    # the Helmert basis is an isometry: |y| = |x| for mean-free x
    expected = -0.5 * x.pow(2).sum(-1) / s**2 - (n - 1) * d * (math.log(s) + 0.5 * math.log(2 * math.pi))
    assert torch.allclose(flow.log_prob(x), expected, atol=1e-12)
    shifted = x + torch.tensor([3.0, -1.0]).repeat(n)  # translations do not change log q
    assert torch.allclose(flow.log_prob(shifted), flow.log_prob(x), atol=1e-12)


@pytest.mark.parametrize("transform", ["smooth", "spline"])
@pytest.mark.parametrize("particles", [None, (3, 2)])
def test_round_trip_and_ladj_against_autograd(float64, transform, particles):
    kw = dict(n_particles=particles[0], spatial_dim=particles[1]) if particles else {}
    torch.manual_seed(1)
    flow = _scrambled(RealFlow(6, scale=1.5, transform=transform, identity_init=False, hidden=16,
                               n_components=4, **kw))
    x = flow.project(1.5 * torch.randn(6, 6))
    z, ladj = flow.to_latent(x)
    x_back, ladj_inv = flow.to_data(z)
    assert torch.allclose(x_back, x, atol=1e-8)
    assert torch.allclose(ladj_inv, -ladj, atol=1e-7)
    free = flow.free_dim
    for b in range(3):  # Jacobian of z with respect to the free coordinates y
        def f(y):
            return flow.to_latent(flow._from_free(y))[0]
        jac = torch.autograd.functional.jacobian(f, flow._to_free(x[b:b + 1]))[0, :, 0, :]
        assert jac.shape == (free, free)
        assert torch.allclose(torch.slogdet(jac)[1], ladj[b], atol=1e-8)
    samples, log_q = flow.sample_and_log_prob(32)
    assert torch.allclose(log_q, flow.log_prob(samples), atol=1e-8)


def test_config_rebuilds_the_flow(float64):
    flow = _scrambled(RealFlow(4, scale=3.0, identity_init=False, hidden=[8, 8], n_components=3))
    clone = RealFlow.from_config(flow.config)
    clone.load_state_dict(flow.state_dict())
    x = torch.randn(5, 4)
    assert torch.equal(clone.log_prob(x), flow.log_prob(x))
    with pytest.raises(ValueError, match="scale"):
        RealFlow(2, scale=0.0)
    with pytest.raises(ValueError, match="n_particles"):
        RealFlow(8, n_particles=4)


# -- HMC and AIS -------------------------------------------------------------------------------
def test_hmc_leaves_a_correlated_gaussian_invariant():
    torch.manual_seed(0)
    cov = torch.tensor([[1.0, 0.8], [0.8, 2.0]], dtype=torch.float64)
    mean = torch.tensor([1.0, -2.0], dtype=torch.float64)
    prec = torch.linalg.inv(cov)

    def log_densities(x):
        d = x - mean
        lp, grad = -0.5 * ((d @ prec) * d).sum(-1), -(d @ prec)
        return lp, lp, grad, grad

    # start *at* the invariant law: any drift of the moments is the kernel's fault
    x = mean + torch.randn(4000, 2, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    state = PointState.at(x, log_densities)
    for _ in range(30):
        state, accept = hmc_step(state, log_densities, 1.0, 0.6, 5)
    assert 0.5 < float(accept.mean()) < 1.0
    # 4000 samples: SE(mean) ≈ 0.02–0.03, SE(var) ≈ 0.02–0.05; tolerances ≈ 4 SE
    assert torch.allclose(state.x.mean(0), mean, atol=0.1)
    assert torch.allclose(torch.cov(state.x.T), cov, atol=0.18)


def test_ais_weights_are_unbiased_for_log_z_of_a_gaussian_pair():
    """π₀ = N(0, 1) normalised, π₁ = exp(−(x − 1)²/(2·0.5²)) unnormalised: Z = 0.5·√(2π)."""
    torch.manual_seed(0)

    def log_densities(x):
        log0 = -0.5 * x[:, 0] ** 2 - 0.5 * math.log(2 * math.pi)
        log1 = -0.5 * ((x[:, 0] - 1.0) / 0.5) ** 2
        return log0, log1, -x, -(x - 1.0) / 0.25

    z_true = 0.5 * math.sqrt(2 * math.pi)
    for n_levels, spacing in ((1, "linear"), (4, "geometric")):
        step_sizes = torch.full((n_levels,), 0.4, dtype=torch.float64)
        result = annealed_importance_sampling(torch.randn(20000, 1, dtype=torch.float64), log_densities,
                                              beta_schedule(n_levels, spacing), step_sizes, n_leapfrog=3)
        w = result.log_w.exp()
        se = float(w.std() / math.sqrt(len(w)))
        assert abs(float(w.mean()) - z_true) < 3.5 * se, (n_levels, float(w.mean()), z_true, se)
        # the weighted samples have the target's mean
        assert abs(float((w * result.x[:, 0]).sum() / w.sum()) - 1.0) < 0.03


def test_beta_schedule_and_step_size_adaptation():
    betas = beta_schedule(4, "geometric")
    assert betas[0] == 0 and betas[-1] == 1 and bool((betas.diff() > 0).all())
    assert torch.allclose(betas[1], torch.tensor(0.1, dtype=torch.float64))
    assert torch.allclose(beta_schedule(2, "linear"), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="geometric, linear"):
        beta_schedule(3, "cosine")

    def log_densities(x):
        lp = -0.5 * x.pow(2).sum(-1)
        return lp, lp, -x, -x

    steps = torch.tensor([5.0], dtype=torch.float64)  # far too large: acceptance ≈ 0, so it shrinks
    for _ in range(10):
        annealed_importance_sampling(torch.randn(256, 3, dtype=torch.float64), log_densities,
                                     beta_schedule(1), steps, n_leapfrog=3, adapt=True)
    assert float(steps[0]) == pytest.approx(5.0 / 1.05 ** 10)


def test_prioritised_buffer_samples_by_weight_and_reweights():
    torch.manual_seed(0)
    buffer = PrioritisedBuffer(1, capacity=3)
    buffer.add(torch.tensor([[0.0], [1.0]]), torch.tensor([0.0, math.log(3.0)]), torch.zeros(2))
    hits = sum(int(buffer.sample(1)[1][0, 0]) for _ in range(4000))
    assert abs(hits / 4000 - 0.75) < 0.03
    idx, _, _ = buffer.sample(2)
    buffer.reweight(idx, torch.full((2,), 0.5))  # q went up by e^0.5 at both: weights drop by e^-0.5
    assert torch.allclose(buffer.log_w[:2], torch.tensor([-0.5, math.log(3.0) - 0.5], dtype=torch.float64))
    buffer.add(torch.tensor([[2.0], [3.0]]), torch.zeros(2), torch.zeros(2))  # ring: overwrites index 0
    assert len(buffer) == 3 and buffer.x[:, 0].tolist() == [3.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="fewer"):
        buffer.sample(4)


# -- the methods -------------------------------------------------------------------------------
def test_methods_are_registered_and_reject_unknown_options():
    assert {"fab", "reverse-kl"} <= set(method_names())
    with pytest.raises(ValueError, match="n_intermediate"):
        get_method("fab").options({"n_intermediat": 2})


def test_energy_cut_is_c1_and_only_changes_high_energies(float64):
    from openmm_flowforce.samplers.reverse_kl import regularised_energy

    u = torch.tensor([-50.0, 99.0, 100.0, 101.0, 1e15], dtype=torch.float64, requires_grad=True)
    out = regularised_energy(u, 100.0)
    (grad,) = torch.autograd.grad(out.sum(), u)
    assert torch.equal(out[:3].detach(), u[:3].detach())
    assert out[3].item() == pytest.approx(100.0 + math.log(2.0), rel=1e-12)
    assert out[4].item() == pytest.approx(100.0 + math.log1p(1e15 - 100.0), rel=1e-12)
    assert grad.tolist()[:3] == [1.0, 1.0, 1.0] and grad[3].item() == pytest.approx(0.5)
    # the derivative is continuous at the cut: 1/(1 + u − c) → 1 from above
    above = torch.tensor([100.0 + 1e-9], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(regularised_energy(above, 100.0).sum(), above)
    assert g.item() == pytest.approx(1.0, abs=1e-8)
    assert regularised_energy(u, None) is u


def test_energy_cut_comes_from_the_lj_preset_and_is_validated():
    from openmm_flowforce.samplers.flow_training import resolve_options

    method = get_method("reverse-kl")
    assert resolve_options(method.options({}), get_target("lj13"))["energy_cut"] == 100.0
    assert resolve_options(method.options({}), get_target("dw4"))["energy_cut"] is None
    assert "energy_cut" not in resolve_options(get_method("fab").options({}), get_target("lj13"))
    with pytest.raises(ValueError, match="energy_cut"):
        resolve_options(method.options({"energy_cut": "high"}), get_target("lj13"))


def _reference_metrics(method, model, target, ref):
    torch.manual_seed(123)
    x = method.sample(model, 2000)
    log_w = -target.energy(x) - method.log_prob(model, x)
    return {"nll": -float(method.log_prob(model, ref).mean()), "ess": ess(log_w),
            "reverse_kl": float(-log_w.mean()), "log_z": log_partition(log_w)}


@pytest.fixture(scope="module")
def gmm40():
    target = get_target("gmm40")
    return target, target.sample(2000, generator=torch.Generator().manual_seed(1))


FAB_QUICK = dict(SMALL_FLOW, steps=30, batch_size=64, n_intermediate=1, min_buffer=256, buffer_size=1024,
                 lr=1e-3, log_every=5, checkpoint_every=10)


@pytest.fixture(scope="module")
def fab_run(gmm40, tmp_path_factory):
    target, ref = gmm40
    torch.manual_seed(0)  # the run must not depend on which tests ran before
    method = get_method("fab")
    model = method.build(target, FAB_QUICK)
    before = _reference_metrics(method, model, target, ref)
    out = tmp_path_factory.mktemp("fab")
    summary = method.train(model, target, FAB_QUICK, out / "fab.ckpt", progress=False, log_path=out / "fab.jsonl")
    return method, model, before, _reference_metrics(method, model, target, ref), summary, out


def test_fab_on_gmm40_beats_its_initial_flow(fab_run):
    _, _, before, after, summary, out = fab_run
    # initial N(0, 25²·I): NLL ≈ 9.1, ESS ≈ 0.06; 30 quick FAB steps: NLL ≈ 8.2, ESS ≈ 0.17
    assert after["nll"] < before["nll"] - 0.5, (before, after)
    assert after["ess"] > 1.5 * before["ess"], (before, after)
    # energy evaluations: 4 filling AIS runs + 30 AIS runs, 64 chains, 1 + 2 levels·5 leapfrog each
    assert summary["energy_evaluations"] == (4 + 30) * 64 * (1 + 2 * 5)
    rows = [json.loads(line) for line in (out / "fab.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert rows[-1]["energy_evaluations"] == summary["energy_evaluations"]
    assert {"ess_flow", "ess_ais", "accept_first", "step_size"} <= set(rows[-1])


def test_log_z_of_gmm40_from_the_fab_flow_is_zero_within_three_standard_errors(fab_run, gmm40):
    """GMM-40's log density is normalised, so the flow's importance weights must give log Z ≈ 0.

    The quickly trained flow still covers every mode (the initial Gaussian does, and FAB
    is mass covering), so its importance weights are a reasonable estimator here."""
    method, model, _, after, _, _ = fab_run
    log_z, se = after["log_z"]
    assert se < 0.2 and abs(log_z) < 3 * se + 1e-3, (log_z, se)


def test_reverse_kl_on_gmm40_lowers_the_reverse_kl(gmm40, tmp_path):
    """Reverse KL is mode seeking on GMM-40 (the forward NLL gets *worse*); what it must
    improve is its own objective, E_q[log q + u] = KL(q‖p) − log Z, on fresh samples."""
    target, ref = gmm40
    method = get_method("reverse-kl")
    opts = dict(SMALL_FLOW, steps=100, batch_size=64, lr=1e-3)
    model = method.build(target, opts)
    before = _reference_metrics(method, model, target, ref)
    summary = method.train(model, target, opts, tmp_path / "rkl.ckpt", progress=False)
    after = _reference_metrics(method, model, target, ref)
    assert summary["energy_evaluations"] == 100 * 64
    assert after["reverse_kl"] < before["reverse_kl"] - 5.0, (before, after)
    assert after["reverse_kl"] > math.log(1.0) - 0.1  # KL ≥ 0 and log Z = 0 (up to sampling noise)


@pytest.mark.parametrize("name,extra", [("fab", dict(n_intermediate=1, min_buffer=32, buffer_size=64,
                                                     n_updates=2)),
                                        ("reverse-kl", {})])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, name, extra):
    target = get_target("dw4")
    method = get_method(name)
    opts = dict(n_layers=2, hidden=8, n_components=3, batch_size=16, steps=4, log_every=1, checkpoint_every=2,
                **extra)
    straight = method.build(target, opts)
    s1 = method.train(straight, target, opts, tmp_path / "a.ckpt", progress=False, log_path=tmp_path / "a.jsonl")

    half = method.build(target, opts)
    method.train(half, target, {**opts, "steps": 2}, tmp_path / "b.ckpt", progress=False,
                 log_path=tmp_path / "b.jsonl")
    resumed = method.build(target, opts)  # a fresh process would rebuild the model like this
    s2 = method.train(resumed, target, opts, tmp_path / "b.ckpt", progress=False, log_path=tmp_path / "b.jsonl")

    assert s2["resumed_from"] == 2 and s2["steps"] == 4
    assert s1["energy_evaluations"] == s2["energy_evaluations"]
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert (tmp_path / "a.jsonl").read_text().count("\n") == (tmp_path / "b.jsonl").read_text().count("\n") == 4
    x = method.sample(resumed, 8)  # DW-4 flow samples are mean free
    assert x.shape == (8, 8)
    assert torch.allclose(x.reshape(8, 4, 2).mean(1), torch.zeros(8, 2, dtype=x.dtype), atol=1e-10)
    with pytest.raises(ValueError, match="batch_size"):
        method.train(resumed, target, {**opts, "batch_size": 8}, tmp_path / "b.ckpt", progress=False)


def test_checkpoint_loads_through_the_shared_sampler_loader(tmp_path):
    from openmm_flowforce.samplers.common import load_sampler, make_target

    target = make_target("gmm40")
    method = get_method("reverse-kl")
    opts = dict(n_layers=2, hidden=8, n_components=3, batch_size=16, steps=2)
    model = method.build(target, opts)
    method.train(model, target, opts, tmp_path / "r.ckpt", progress=False)
    loaded = load_sampler(tmp_path / "r.ckpt")
    assert loaded.method.name == "reverse-kl" and loaded.checkpoint["summary"]["energy_evaluations"] == 32
    x = torch.randn(5, 2, dtype=torch.float64)
    assert torch.equal(loaded.method.log_prob(loaded.model, x), method.log_prob(model, x))
