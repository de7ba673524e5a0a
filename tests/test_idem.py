"""iDEM: Monte Carlo score estimator, EGNN equivariance, a short run that learns, exact
resume, and ``flowforce sampler`` train → sample → evaluate."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from openmm_flowforce.cli.main import main
from openmm_flowforce.nn.egnn import EGNN
from openmm_flowforce.samplers import get_method, method_names
from openmm_flowforce.samplers.common import load_sampler, make_target
from openmm_flowforce.samplers.idem import GeometricNoiseSchedule, clip_score_norm, estimate_noised_score

# Small everything: a few seconds per run on one core.
TINY = dict(n_mc=20, batch=16, n_generate=32, integration_steps=10, steps_per_outer=2, hidden=8, n_layers=2,
            n_init=64, checkpoint_every=3, log_every=1, ode_steps=4, ema=0.5)


def _score_error(k: int, sigma: float, seed: int = 0) -> float:
    """RMS error of S_K against the exact noised score of E = |x|²/2: −x/(1+σ²)."""
    g = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(200, 3, dtype=torch.float64, generator=g)
    s = torch.full((200,), sigma, dtype=torch.float64)
    est = estimate_noised_score(lambda y: 0.5 * y.pow(2).sum(-1), x, s, k, generator=g)
    return float((est + x / (1 + sigma ** 2)).pow(2).sum(-1).mean().sqrt())


def test_score_estimator_converges_to_gaussian_score():
    errors = [_score_error(k, 1.5) for k in (10, 100, 1000, 10000)]
    assert all(a > 1.8 * b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.15
    # Small noise: S_K = −x − σ·(weighted mean of ε) + O(σ²), an error of order σ for any K.
    assert _score_error(10, 1e-3) < 2e-3


def test_score_estimator_mean_free_noise_and_nonfinite_energies():
    # Translation-invariant pair energy: the estimated score must be mean-free over particles.
    target = make_target("dw4")
    x = target.remove_mean(torch.randn(8, 8, dtype=torch.float64))
    est = estimate_noised_score(target.energy, x, torch.full((8,), 0.5, dtype=torch.float64), 50, (4, 2))
    assert est.reshape(8, 4, 2).sum(1).abs().max() < 1e-10

    # Noised points with infinite energy get weight 0; all infinite gives score 0, not NaN.
    def energy(y):
        return torch.where(y[:, 0] > 0, torch.full_like(y[:, 0], torch.inf), 0.5 * y.pow(2).sum(-1))

    est = estimate_noised_score(energy, torch.tensor([[-50.0, 0.0], [50.0, 0.0]], dtype=torch.float64),
                                torch.full((2,), 0.1, dtype=torch.float64), 100)
    assert torch.isfinite(est).all()
    assert est[0, 0] == pytest.approx(50.0, rel=0.01) and est[1].abs().max() == 0


def test_clip_score_norm_per_particle():
    s = torch.tensor([[3.0, 4.0, 0.3, 0.4]], dtype=torch.float64)
    clipped = clip_score_norm(s, 1.0, particles=(2, 2))
    assert torch.allclose(clipped, torch.tensor([[0.6, 0.8, 0.3, 0.4]], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(clip_score_norm(s, 1.0).norm(), torch.tensor(1.0, dtype=torch.float64), atol=1e-6)


def test_geometric_schedule():
    schedule = GeometricNoiseSchedule(0.01, 2.0)
    t = torch.linspace(0, 1, 11, dtype=torch.float64, requires_grad=True)
    sigma = schedule.sigma(t.detach())
    assert sigma[0] == 0 and float(sigma[-1]) == pytest.approx((2.0 ** 2 - 0.01 ** 2) ** 0.5, rel=1e-12)
    (dvar,) = torch.autograd.grad(schedule.variance(t).sum(), t)
    assert torch.allclose(dvar, schedule.g2(t.detach()), rtol=1e-12)


@pytest.mark.parametrize("n_particles,dim", [(5, 3), (4, 2)])
def test_egnn_equivariance(n_particles, dim):
    torch.manual_seed(0)
    net = EGNN(n_particles, dim, n_conditions=1, hidden=16, n_layers=3).double()
    for layer in net.layers:  # larger coordinate steps than at initialisation: a real test
        torch.nn.init.normal_(layer.coord_mlp[-1].weight, std=0.5)
    b = 6
    x = torch.randn(b, n_particles * dim, dtype=torch.float64)
    t = torch.rand(b, 1, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64))
    q = q * torch.tensor([-1.0] + [1.0] * (dim - 1), dtype=torch.float64)  # include a reflection
    perm = torch.randperm(n_particles)
    shift = 3.0 * torch.randn(dim, dtype=torch.float64)
    v = net(x, t).reshape(b, n_particles, dim)
    assert v.abs().max() > 1e-2
    moved = (x.reshape(b, n_particles, dim) @ q + shift)[:, perm].reshape(b, -1)
    v_moved = net(moved, t).reshape(b, n_particles, dim)
    assert torch.allclose(v_moved, (v @ q)[:, perm], atol=1e-8, rtol=0)
    assert v.sum(1).abs().max() < 1e-10  # mean-free output
    assert net(x.reshape(b, n_particles, dim), t).shape == (b, n_particles, dim)


def test_ema_average_is_what_eval_mode_scores_with():
    from openmm_flowforce.samplers.idem import IDEMModel

    torch.manual_seed(0)
    model = IDEMModel(2, None, "mlp", 8, 2, sigma_min=0.01, sigma_max=1.0, ema=True)
    before = [p.clone() for p in model.net.parameters()]
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(1.0)
    model.update_ema(0.75)  # θ_ema = 0.75 θ_old + 0.25 (θ_old + 1)
    for averaged, old in zip(model.ema_net.parameters(), before):
        torch.testing.assert_close(averaged, old + 0.25)
    z, t = torch.randn(5, 2), torch.rand(5)
    torch.testing.assert_close(model.eval().score(z, t), model.ema_net(z, t))
    torch.testing.assert_close(model.train().score(z, t), model.net(z, t))
    assert not (model.eval().score(z, t) - model.net(z, t)).abs().max() < 1e-3


def test_idem_registered_with_per_target_defaults():
    assert "idem" in method_names()
    method = get_method("idem")
    assert method.resolve(make_target("lj13"), {})["network"] == "egnn"
    assert method.resolve(make_target("gmm40"), {})["data_scale"] == 50.0
    with pytest.raises(ValueError, match="unknown option.*valid:"):
        method.options({"n_mc_samples": 3})
    assert method.resolve(make_target("dw4"), {})["divergence"] == "exact"


def test_idem_learns_gmm40(tmp_path):
    """A short run moves the samples from the broad prior onto the 40 modes."""
    from openmm_flowforce.analysis.metrics import w2_samples

    target = make_target("gmm40")
    method = get_method("idem")
    options = method.options(dict(n_mc=100, batch=128, steps=250, steps_per_outer=50, n_generate=500,
                                  integration_steps=100))
    model = method.build(target, options)
    reference = target.sample(1000, generator=torch.Generator().manual_seed(1))
    before = model.sample(1000, torch.Generator().manual_seed(0))
    summary = method.train(model, target, options, tmp_path / "g.ckpt", progress=False, log_path=tmp_path / "g.jsonl")
    after = model.sample(1000, torch.Generator().manual_seed(0))
    w2_before, w2_after = w2_samples(before, reference), w2_samples(after, reference)
    distance = torch.cdist(after.double(), target.means)
    near = distance.min(1).values < 3 * target.std
    modes = len(set(distance.argmin(1)[near].tolist()))
    assert w2_after < 0.45 * w2_before, (w2_before, w2_after)
    assert modes >= 10 and near.float().mean() > 0.1, (modes, near.float().mean())
    # 250 steps × 128 points × K = 100, plus the energies of 4 × 500 generated samples.
    assert summary["energy_evaluations"] == 250 * 128 * 100 + 4 * 500
    rows = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 250 and rows[-1]["energy_evaluations"] == summary["energy_evaluations"]


def test_idem_exact_resume(tmp_path):
    target = make_target("dw4")
    method = get_method("idem")
    straight = method.build(target, dict(TINY, steps=7))
    method.train(straight, target, dict(TINY, steps=7), tmp_path / "a.ckpt", progress=False)

    resumed = method.build(target, dict(TINY, steps=3))
    method.train(resumed, target, dict(TINY, steps=3), tmp_path / "b.ckpt", progress=False,
                 log_path=tmp_path / "b.jsonl")
    again = method.build(target, dict(TINY, steps=7))
    summary = method.train(again, target, dict(TINY, steps=7), tmp_path / "b.ckpt", progress=False,
                           log_path=tmp_path / "b.jsonl")
    assert summary["resumed_from"] == 3 and summary["steps"] == 7
    a = torch.load(tmp_path / "a.ckpt", weights_only=True)
    b = torch.load(tmp_path / "b.ckpt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["engine"]["state"]["idem"]["buffer"], b["engine"]["state"]["idem"]["buffer"])
    assert a["summary"]["energy_evaluations"] == b["summary"]["energy_evaluations"]
    assert [json.loads(r)["step"] for r in (tmp_path / "b.jsonl").read_text().splitlines()] == list(range(1, 8))
    with pytest.raises(ValueError, match="different options: n_mc"):
        method.train(again, target, dict(TINY, steps=8, n_mc=21), tmp_path / "b.ckpt", progress=False)
    loaded = load_sampler(tmp_path / "b.ckpt")
    assert loaded.method.name == "idem" and loaded.method.sample(loaded.model, 5).shape == (5, 8)


def test_cli_sampler_train_sample_evaluate(tmp_path, capsys):
    config = tmp_path / "idem.yaml"
    config.write_text("options: " + json.dumps({k: v for k, v in TINY.items()}) + "\n")
    ckpt = tmp_path / "s.ckpt"
    args = ["sampler", "train", "--target", "dw4", "--method", "idem", "--out", str(ckpt), "--steps", "4",
            "--config", str(config), "--quiet"]
    assert main(args) == 0
    assert main(args[:-4] + ["6", "--config", str(config), "--quiet"]) == 0  # resumes to 6 steps
    assert "(resumed from step 4)" in capsys.readouterr().out
    assert torch.load(ckpt, weights_only=True)["summary"]["steps"] == 6

    assert main(["sampler", "sample", str(ckpt), "-n", "50", "--out", str(tmp_path / "x.npy")]) == 0
    assert np.load(tmp_path / "x.npy").shape == (50, 8)

    reference = make_target("dw4").remove_mean(torch.randn(200, 8, dtype=torch.float64) * 2).numpy()
    np.save(tmp_path / "ref.npy", reference)
    report_path = tmp_path / "report.json"
    assert main(["sampler", "evaluate", str(ckpt), "--reference", str(tmp_path / "ref.npy"), "-n", "40",
                 "--out", str(report_path), "--ode-steps", "3", "--divergence", "hutchinson", "--probes", "2"]) == 0
    report = json.loads(report_path.read_text())
    for key in ("w2_unaligned", "w2_aligned", "w2_energy", "tv_distances", "energy_evaluations",
                "training_wall_time_s"):
        assert isinstance(report[key], (int, float)), key
    assert report["w2_aligned"] <= report["w2_unaligned"] + 1e-9
    # NLL and ESS from the probability-flow ODE (tests/test_pf_ode.py checks its density).
    assert math.isfinite(report["nll"]) and 0.0 < report["ess"] <= 1.0 and report["method"] == "idem"
    from openmm_flowforce.analysis.sampler_report import load_reference

    compared = load_reference(str(tmp_path / "ref.npy"), make_target("dw4"), 40)  # the 40 the report used
    u_ref = np.sort(make_target("dw4").energy(torch.as_tensor(compared)).numpy())
    assert report["energy_median_reference"] == pytest.approx(float(u_ref[19]))  # torch's median: the lower one
    assert math.isfinite(report["energy_median_generated"])

    capsys.readouterr()
    bad = [
        ["sampler", "train", "--target", "dw5", "--method", "idem", "--out", str(tmp_path / "u.ckpt")],
        ["sampler", "train", "--target", "dw4", "--method", "nope", "--out", str(tmp_path / "u.ckpt")],
        ["sampler", "sample", str(tmp_path / "missing.ckpt"), "-n", "3", "--out", str(tmp_path / "y.npy")],
        ["sampler", "evaluate", str(ckpt), "--reference", str(tmp_path / "ref.npy"), "-n", "500",
         "--out", str(tmp_path / "r.json")],
    ]
    for argv in bad:
        assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "valid names: " in err and "dw4, gmm40" in err and "valid names:" in err.split("nope")[1]
    assert "idem" in err.split("nope")[1]
    config.write_text("options: {n_mc: 3}\nsteps: 3\n")
    assert main(args) == 2
    assert "unknown option steps; valid: options, target_options" in capsys.readouterr().err
