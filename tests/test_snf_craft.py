"""Stochastic normalizing flows and CRAFT: exact reductions (plain flow, AIS), unbiased log Z
on Gaussians with known normalisers, Metropolis–Hastings detailed balance, training and
resume through the sampler registry."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from openmm_flowforce.analysis.metrics import log_partition
from openmm_flowforce.errors import FlowforceError
from openmm_flowforce.flows import RealFlow
from openmm_flowforce.samplers import get_method
from openmm_flowforce.samplers.ais import annealed_importance_sampling
from openmm_flowforce.samplers.common import load_sampler, make_target
from openmm_flowforce.samplers.craft import CRAFTModel, annealing_log_densities, smc, systematic_resample
from openmm_flowforce.samplers.snf import StochasticNormalizingFlow
from openmm_flowforce.samplers.stochastic import MetropolisHastings, make_evaluator, make_layer
from openmm_flowforce.samplers.transport import GaussianPrior, RealCoupling


class ShiftedGaussian:
    """u(x) = ½ Σ ((x − μ)/σ)², log Z = Σ log(σ √(2π)) (known exactly)."""

    def __init__(self, mean, std):
        self.mean, self.std = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
        self.dim = len(mean)
        self.log_z = float(torch.log(self.std * math.sqrt(2 * math.pi)).sum())

    def energy(self, x):
        return 0.5 * (((x - self.mean) / self.std) ** 2).sum(-1)


def _scrambled(module, amount=0.3):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(amount * torch.randn_like(p))
    return module


def _snf(target, layer="overdamped", n_blocks=4, steps=3, step=0.1, path="gaussian", n_between=0, scale=1.0):
    flow = RealFlow(target.dim, scale=scale, hidden=8, n_layers=2, n_components=4).double()
    prior = GaussianPrior(target.dim, scale)
    lams = [(k + 1) / n_blocks for k in range(n_blocks)]
    layers = [make_layer(layer, lam, steps, step) for lam in lams]
    couplings = [RealCoupling(target.dim, scale, n_layers=n_between, hidden=8, n_components=4,
                              transform="spline").double()
                 for _ in lams] if n_between else []
    return StochasticNormalizingFlow(flow, prior, layers, couplings, path, target)


# -- SNF -------------------------------------------------------------------------------------
def test_snf_without_stochastic_moves_is_the_plain_flow(float64):
    target = ShiftedGaussian([1.0, -0.5, 0.3], [0.7, 1.2, 1.0])
    plain = _snf(target, n_blocks=0)
    _scrambled(plain.flow)
    torch.manual_seed(3)
    x, log_q, u = plain.forward_path(50)
    torch.manual_seed(3)
    x_ref, log_q_ref = plain.flow.sample_and_log_prob(50)
    assert torch.equal(x, x_ref) and torch.equal(log_q, log_q_ref)
    assert torch.allclose(-u - log_q, -target.energy(x_ref) - log_q_ref, atol=0, rtol=0)
    # zero-length stochastic layers and identity deterministic layers: the same weights
    idle = _snf(target, n_blocks=3, steps=0, n_between=2)
    idle.flow.load_state_dict(plain.flow.state_dict())
    torch.manual_seed(3)
    x2, log_q2, u2 = idle.forward_path(50)
    assert torch.allclose(x2, x_ref, atol=1e-12) and torch.allclose(log_q2, log_q_ref, atol=1e-10)
    assert torch.allclose(idle.path_log_prob(x_ref), plain.flow.log_prob(x_ref), atol=1e-10)
    # a scrambled deterministic layer: the path density is the change-of-variables density
    _scrambled(idle.couplings[0], 0.5)
    torch.manual_seed(3)
    x3, log_q3, _ = idle.forward_path(50)
    y, ladj = idle.couplings[0](x_ref)
    assert torch.allclose(x3, y, atol=1e-10) and torch.allclose(log_q3, log_q_ref - ladj, atol=1e-8)
    assert torch.allclose(idle.path_log_prob(x3), log_q3, atol=1e-6)


def test_real_coupling_round_trip_and_ladj_against_autograd(float64):
    torch.manual_seed(0)
    for particles in (None, (3, 2)):
        kw = dict(n_particles=particles[0], spatial_dim=particles[1]) if particles else {}
        layer = _scrambled(RealCoupling(6, 1.5, n_layers=2, hidden=8, n_components=4, **kw).double(), 0.5)
        x = layer.project(1.5 * torch.randn(5, 6))
        y, ladj = layer(x)
        x_back, ladj_inv = layer.inverse(y)
        assert torch.allclose(x_back, x, atol=1e-8) and torch.allclose(ladj_inv, -ladj, atol=1e-8)
        for b in range(2):
            jac = torch.autograd.functional.jacobian(
                lambda f: layer.to_free(layer(layer.from_free(f))[0]), layer.to_free(x[b:b + 1]))[0, :, 0, :]
            assert torch.allclose(torch.slogdet(jac)[1], ladj[b], atol=1e-8)


@pytest.mark.parametrize("layer,step", [("overdamped", 0.2), ("underdamped", 0.3), ("mh", 0.8)])
def test_snf_weights_estimate_log_z_without_bias(float64, layer, step):
    """E[w] = Z for any step size: log-mean-exp of 8000 path weights within 4 standard errors."""
    target = ShiftedGaussian([1.5, -1.0], [0.6, 1.3])
    model = _snf(target, layer=layer, step=step, n_blocks=4, steps=3)
    torch.manual_seed(11)
    with torch.no_grad():
        x, log_q, u = model.forward_path(8000)
    log_z, se = log_partition(-u - log_q)
    assert abs(log_z - target.log_z) < 4 * se + 1e-3, (log_z, se, target.log_z)
    assert se < 0.06  # the check has teeth: a wrong path ratio shifts log Z by far more
    # the layers move the samples towards the target (the flow alone is N(0, 1))
    assert float((x.mean(0) - target.mean).norm()) < 0.5 * float(target.mean.norm())


@pytest.mark.parametrize("layer", ["overdamped", "underdamped"])
def test_path_weight_gradient_through_langevin_drifts_passes_gradcheck(float64, layer):
    """The reparameterisation gradient of the mean path log weight with respect to the step
    sizes (double backward through the drifts) against finite differences, fixed noise."""
    target = ShiftedGaussian([1.0, -0.5], [0.7, 1.2])
    model = _snf(target, layer=layer, n_blocks=2, steps=2, step=0.2, path="flow")
    _scrambled(model.flow, 0.1)

    def mean_log_w(log_steps):
        torch.manual_seed(4)
        params = {f"layers.{k}.log_step": log_steps[k] for k in range(2)}
        x, log_q, u = torch.func.functional_call(model, params, (16,), {"create_graph": True})
        return (-u - log_q).mean()

    log_steps = torch.tensor([math.log(0.2), math.log(0.3)], requires_grad=True)
    assert torch.autograd.gradcheck(mean_log_w, (log_steps,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_langevin_path_ratio_is_the_gaussian_kernel_ratio(float64):
    """ΔS of one overdamped step equals log N(x; x' − ε∇U(x'), 2ε) − log N(x'; x − ε∇U(x), 2ε)."""
    target = ShiftedGaussian([0.5, -0.2], [0.8, 1.1])
    prior = GaussianPrior(2, 1.0)
    evaluate = make_evaluator(prior.energy, target.energy, prior, create_graph=False)
    layer = make_layer("overdamped", 0.6, 1, 0.2)
    point = evaluate(torch.randn(7, 2))
    new, delta = layer(point, evaluate, prior)
    eps = 0.2
    kernel = torch.distributions.Normal
    fwd = kernel(point.x - eps * point.grad(0.6), math.sqrt(2 * eps)).log_prob(new.x).sum(-1)
    bwd = kernel(new.x - eps * new.grad(0.6), math.sqrt(2 * eps)).log_prob(point.x).sum(-1)
    assert torch.allclose(delta, bwd - fwd, atol=1e-10)


def test_metropolis_layer_acceptance_and_detailed_balance(float64):
    target = ShiftedGaussian([1.0], [0.5])
    prior = GaussianPrior(1, 1.0)
    evaluate = make_evaluator(prior.energy, target.energy, prior, create_graph=False)
    layer = MetropolisHastings(1.0, 1, 0.9)
    n = 200000
    x = target.mean + target.std * torch.randn(n, 1)  # exact samples of π = exp(−U)/Z
    point = evaluate(x)
    torch.manual_seed(5)
    new, delta = layer(point, evaluate, GaussianPrior(1, 1.0))
    # replay the same random numbers: the proposal and the acceptance rule min(1, e^{−ΔU})
    torch.manual_seed(5)
    proposal = x + 0.9 * torch.randn(n, 1)
    accept = torch.rand(n) < torch.exp(target.energy(x) - target.energy(proposal)).clamp(max=1.0)
    assert torch.equal(new.x, torch.where(accept[:, None], proposal, x))
    assert torch.allclose(delta, target.energy(new.x) - target.energy(x), atol=1e-12)
    # detailed balance: (x, x') is exchangeable under π ⊗ K
    a, b = x[:, 0], new.x[:, 0].detach()
    for f, g in ((a * b ** 2, a ** 2 * b), (((a < 0.8) & (b > 1.3)).double(), ((b < 0.8) & (a > 1.3)).double())):
        diff = f - g
        assert abs(float(diff.mean())) < 5 * float(diff.std()) / math.sqrt(n)  # 5 standard errors
    assert abs(float(b.mean()) - 1.0) < 5 * 0.5 / math.sqrt(n) * 3  # π stays invariant (correlated draws)


def test_snf_trains_by_reverse_kl_and_resumes_exactly(float64, tmp_path):
    target = make_target("gmm40")
    method = get_method("snf")
    options = method.options(dict(steps=2, batch_size=16, n_layers=2, hidden=8, n_components=4, n_blocks=2,
                                  block_steps=1, checkpoint_every=1, log_every=1))
    model = method.build(target, options)
    summary = method.train(model, target, options, tmp_path / "a.ckpt", progress=False)
    assert summary["steps"] == 2 and summary["energy_evaluations"] == 2 * 16 * 3
    half = method.build(target, options)
    method.train(half, target, {**options, "steps": 1}, tmp_path / "b.ckpt", progress=False)
    resumed = method.build(target, options)
    method.train(resumed, target, options, tmp_path / "b.ckpt", progress=False)
    for (k, p), q in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), k
    loaded = load_sampler(tmp_path / "a.ckpt")
    x, log_w = loaded.method.sample_with_log_weights(loaded.model, 16)
    assert x.shape == (16, 2) and torch.isfinite(log_w).all()


@pytest.mark.slow
def test_snf_forward_kl_from_data_lowers_the_path_nll(float64, tmp_path):
    method = get_method("snf")
    gauss = ShiftedGaussian([2.0, -1.0], [0.5, 0.8])
    data = gauss.mean + gauss.std * torch.randn(2000, 2)
    np.save(tmp_path / "data.npy", data.numpy())
    options = method.options(dict(steps=60, batch_size=64, n_layers=2, hidden=16, n_components=4, n_blocks=2,
                                  block_steps=1, scale=1.0, step_size=0.3, objective="forward",
                                  data=str(tmp_path / "data.npy"), lr=1e-2, log_every=1))
    model = method.build(gauss, options)
    before = -float(method.log_prob(model, data[:500]).mean())  # ≈ 4.8 for N(0, 1); the exact NLL is 1.9
    method.train(model, gauss, options, tmp_path / "f.ckpt", progress=False)
    after = -float(method.log_prob(model, data[:500]).mean())
    assert after < before - 1.0, (before, after)


def test_snf_bad_options_name_the_fix(tmp_path):
    method = get_method("snf")
    with pytest.raises(FlowforceError, match="layer"):
        method.options({"layer": "leapfrog"})
    target = make_target("dw4")
    options = method.options({"objective": "forward", "steps": 1})
    with pytest.raises(FlowforceError, match="needs data"):
        method.train(method.build(target, options), target, options, tmp_path / "x.ckpt", progress=False)
    assert not (tmp_path / "x.ckpt").exists()


# -- CRAFT -----------------------------------------------------------------------------------
def _craft(target, k=4, scale=1.0, step=0.5, n_layers=2):
    prior = GaussianPrior(target.dim, scale)
    flows = [RealCoupling(target.dim, scale, n_layers=n_layers, hidden=16, n_components=4).double() for _ in range(k)]
    betas = torch.linspace(0, 1, k + 1, dtype=torch.float64)
    return CRAFTModel(prior, flows, betas, torch.full((k,), step, dtype=torch.float64), target)


def test_craft_with_identity_flows_is_ais(float64):
    target = ShiftedGaussian([1.0, -2.0], [0.5, 2.0])
    model = _craft(target, k=5)
    x0 = model.prior.sample(300)
    torch.manual_seed(7)
    result = smc(model, 300, ess_threshold=0.0, n_hmc=2, n_leapfrog=3, x0=x0)
    torch.manual_seed(7)
    ais = annealed_importance_sampling(x0, annealing_log_densities(model.prior, target.energy), model.betas,
                                       model.step_sizes.clone(), n_leapfrog=3, n_hmc=2)
    assert result.resamples == 0
    assert torch.allclose(result.x, ais.x, atol=1e-8)
    assert torch.allclose(result.importance_log_weights(), ais.log_w, atol=1e-8)
    assert result.log_z == pytest.approx(log_partition(ais.log_w)[0], abs=1e-8)


def test_systematic_resampling_counts_are_floor_or_ceil(float64):
    log_w = torch.log_softmax(torch.randn(1000) * 2, 0)
    counts = torch.bincount(systematic_resample(log_w), minlength=1000).double()
    expected = 1000 * log_w.exp()
    assert bool(((counts >= expected.floor() - 1e-9) & (counts <= expected.ceil() + 1e-9)).all())


def _craft_options(method, **kw):
    return method.options(dict(dict(steps=60, batch_size=128, n_transitions=3, n_layers=2, hidden=16,
                                    n_components=4, scale=1.0, step_size=0.5, lr=5e-3, ess_threshold=0.5,
                                    log_every=1, checkpoint_every=1000), **kw))


def _log_z_repeats(method, model, options, repeats=20, n=256):
    torch.manual_seed(1)
    values = np.array([method.log_z(model, n, options) for _ in range(repeats)])
    return values.mean(), values.std(ddof=1)


#: Gaussian → shifted/scaled Gaussian, log Z known exactly.
CRAFT_TARGET = ([2.0, -1.5], [0.5, 1.5])


def test_craft_log_z_is_unbiased(float64):
    """The mean of log Ẑ over 20 SMC passes is within 4 standard errors (plus the −Var/2
    bias of a log) of the exact log Z."""
    target = ShiftedGaussian(*CRAFT_TARGET)
    method = get_method("craft")
    options = _craft_options(method)
    mean, std = _log_z_repeats(method, method.build(target, options), options)
    assert abs(mean - target.log_z) < 4 * std / math.sqrt(20) + 0.5 * std ** 2 + 1e-3, (mean, std)
    assert 0.0 < std < 0.3
    torch.manual_seed(1)
    mean_api, sem = method.log_z_with_error(method.build(target, options), 256, repeats=20, options=options)
    assert mean_api == pytest.approx(mean, abs=1e-12) and sem == pytest.approx(std / math.sqrt(20), rel=1e-9)


@pytest.mark.slow
def test_craft_training_lowers_the_transport_kl_and_keeps_log_z_unbiased(float64, tmp_path):
    target = ShiftedGaussian(*CRAFT_TARGET)
    method = get_method("craft")
    options = _craft_options(method)
    model = method.build(target, options)
    _, std0 = _log_z_repeats(method, model, options)
    torch.manual_seed(2)
    first = smc(model, 512, ess_threshold=0.5).loss.item()
    method.train(model, target, options, tmp_path / "c.ckpt", progress=False)
    mean1, std1 = _log_z_repeats(method, model, options)
    assert abs(mean1 - target.log_z) < 4 * std1 / math.sqrt(20) + 0.5 * std1 ** 2 + 1e-3, (mean1, std1)
    torch.manual_seed(2)
    assert smc(model, 512, ess_threshold=0.5).loss.item() < 0.7 * first
    assert std1 < std0


# -- an OpenMM System as the target -----------------------------------------------------------
def test_snf_and_craft_sample_an_openmm_system(float64, tmp_path):
    """A real OpenMM System (three particles, harmonic bonds and angle): SNF trains with
    constant forces in its drifts (OpenMM forces are not differentiable twice), CRAFT runs
    SMC; both give finite path weights at configurations OpenMM evaluates to finite energies."""
    import openmm

    from openmm_flowforce.targets import get_target

    system = openmm.System()
    for _ in range(3):
        system.addParticle(12.0)
    bonds = openmm.HarmonicBondForce()
    bonds.addBond(0, 1, 0.15, 2000.0)
    bonds.addBond(1, 2, 0.15, 2000.0)
    angle = openmm.HarmonicAngleForce()
    angle.addAngle(0, 1, 2, 1.9, 200.0)
    system.addForce(bonds)
    system.addForce(angle)
    target = get_target("openmm", system=system, temperature=300.0)
    common = dict(steps=1, batch_size=16, scale=0.1, step_size=0.01, hidden=8, n_components=4, log_every=1)
    snf = get_method("snf")
    options = snf.options(dict(common, n_layers=2, n_blocks=2, block_steps=1))
    model = snf.build(target, options)
    summary = snf.train(model, target, options, tmp_path / "snf.ckpt", progress=False)
    assert math.isfinite(summary["loss"]) and summary["energy_evaluations"] == 16 * 3
    x, log_w = snf.sample_with_log_weights(model, 8)
    assert x.shape == (8, 9) and torch.isfinite(log_w).all()
    craft = get_method("craft")
    options = craft.options(dict(common, n_transitions=2, n_leapfrog=2))
    model = craft.build(target, options)
    summary = craft.train(model, target, options, tmp_path / "craft.ckpt", progress=False)
    assert math.isfinite(summary["loss"]) and summary["energy_evaluations"] == 16 * (1 + 2 * (1 + 2))
    x, log_w = craft.sample_with_log_weights(model, 8)
    energies, _ = target.energies_and_forces(x.reshape(8, 3, 3).numpy())
    assert np.isfinite(energies).all() and torch.isfinite(log_w).all()


def test_cli_snf_forward_kl_without_readable_data_exits_2_and_writes_nothing(tmp_path, capsys):
    from openmm_flowforce.cli.main import main

    (tmp_path / "c.yaml").write_text(f"options: {{objective: forward, data: {tmp_path / 'missing.npy'}, steps: 1}}\n")
    code = main(["sampler", "train", "--target", "dw4", "--method", "snf", "--out", str(tmp_path / "s.ckpt"),
                 "--config", str(tmp_path / "c.yaml"), "--quiet"])
    assert code == 2 and "missing.npy" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_sampler_report_takes_ess_and_log_z_from_the_methods_own_weights(float64):
    from openmm_flowforce.analysis.sampler_report import evaluate_sampler

    target = make_target("gmm40")
    reference = target.sample(64).numpy()
    small = dict(hidden=8, n_components=4)
    for name, options, has_nll in (("craft", dict(small, n_transitions=4), False),
                                   ("snf", dict(small, n_layers=2, n_blocks=2, block_steps=1), True)):
        method = get_method(name)
        model = method.build(target, method.options(options))
        report = evaluate_sampler(method, model, target, reference, align=False)
        assert 0.0 < report["ess"] <= 1.0 and math.isfinite(report["log_z"]), name
        assert (report["nll"] is not None) == has_nll
