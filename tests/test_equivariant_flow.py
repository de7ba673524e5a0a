"""The SE(3)-equivariant augmented coupling flow (arXiv 2308.10364) and its real-line
transforms: round trips, log-determinants against autograd on the zero-CoM subspace,
rotation/translation/permutation equivariance, the importance-sampled marginal, and the
flow inside FAB / reverse KL and the CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch

from openmm_flowforce.bijections.line import get_line_family, line_family_names, logit_mixture
from openmm_flowforce.cli.main import main
from openmm_flowforce.errors import FlowforceError
from openmm_flowforce.flows import helmert_basis
from openmm_flowforce.flows.equivariant import EquivariantAugmentedFlow, orthonormal_frame
from openmm_flowforce.samplers import get_method
from openmm_flowforce.targets import get_target

TINY = dict(n_layers=4, hidden=8, egnn_layers=1, n_components=3)
SYSTEMS = [(3, 3), (4, 2)]  # (N, d): N = 3 in 3-D is always planar, the hard case for frames


def _scrambled(flow: torch.nn.Module, size: float = 0.05) -> torch.nn.Module:
    """Move every parameter off its initial value, so no block is the identity."""
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(size * torch.randn_like(p))
    return flow


def _points(flow: EquivariantAugmentedFlow, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = flow.scale * torch.randn(b, flow.n_particles, flow.spatial_dim)
    x = x - x.mean(dim=1, keepdim=True)
    return x, x + flow.aug_scale * torch.randn_like(x)


def _rotation(d: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


# -- real-line transforms ----------------------------------------------------------------------
@pytest.mark.parametrize("name", line_family_names())
def test_line_transforms_round_trip_with_exact_log_slopes(float64, name):
    family = get_line_family(name)
    raw = family.identity_raw(4) + 0.7 * torch.randn(6, 5, family.n_params(4))
    bijection = family.build(raw)
    x = 3.0 * torch.randn(6, 5)
    x[0] = torch.tensor([-60.0, -25.0, 0.0, 25.0, 60.0])  # far tails: no saturation
    y, ladj = bijection.forward(x)
    back, inv_ladj = bijection.inverse(y)
    assert torch.isfinite(y).all()
    assert torch.allclose(back, x, atol=1e-9, rtol=0)
    assert torch.allclose(ladj, -inv_ladj, atol=1e-9)
    slope = torch.autograd.functional.jacobian(lambda v: bijection.forward(v.reshape(6, 5))[0].reshape(-1),
                                               x.reshape(-1)).diagonal()
    assert (slope > 0).all()
    assert torch.allclose(torch.log(slope).reshape(6, 5).sum(1), ladj, atol=1e-9)


def test_smooth_line_transform_is_a_translation_in_the_tails_and_near_identity_at_init(float64):
    family = get_line_family("smooth")
    raw = family.identity_raw(6).expand(1, 3, -1).clone()
    body = raw[..., 2:]
    a = 1.0 + torch.exp(body[..., :6]); b = 0.5 / a + (1 - 1 / a) * torch.sigmoid(body[..., 6:12])
    w = torch.softmax(body[..., 12:18], -1); c = 0.001 + 0.999 * torch.sigmoid(body[..., 18])
    t = torch.tensor([[-40.0, 0.3, 40.0]])
    g, log_dg = logit_mixture(t, a, b, w, c)
    # Far out f(u) = c·u (or 1 − c(1 − u)) exactly: g = t ± log c, slope exactly 1.
    assert torch.allclose(g[0, [0, 2]], t[0, [0, 2]] + torch.log(c[0, [0, 2]]) * torch.tensor([1.0, -1.0]),
                          atol=1e-10)
    assert torch.allclose(log_dg[0, [0, 2]], torch.zeros(2), atol=1e-10)
    assert abs(float(g[0, 1]) - 0.3) < 0.05 and abs(float(log_dg[0, 1])) < 0.05
    with pytest.raises(FlowforceError, match="valid names: affine, smooth"):
        get_line_family("spline")


# -- frames -----------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [2, 3])
def test_frames_are_orthonormal_right_handed_and_rotate_with_the_input(float64, d):
    v = torch.randn(7, d - 1, d)
    frame = orthonormal_frame(v)
    eye = torch.eye(d).expand(7, d, d)
    assert torch.allclose(frame @ frame.transpose(-1, -2), eye, atol=1e-12)
    assert torch.allclose(torch.det(frame), torch.ones(7), atol=1e-12)
    r = _rotation(d)
    assert torch.allclose(orthonormal_frame(v @ r), frame @ r, atol=1e-12)


# -- the flow: bijection battery ------------------------------------------------------------
@pytest.mark.parametrize("transform", ["affine", "smooth"])
@pytest.mark.parametrize("n,d", SYSTEMS)
def test_round_trip_and_ladj_against_autograd_on_the_com_free_subspace(float64, transform, n, d):
    """The flow acts on (x, a) modulo a common translation: coordinates (H·x, a) with H the
    Helmert basis ((N−1)·d + N·d of them), in which the density is defined; the Jacobian
    of (Hx, a) → (H z_x, z_a) must have log|det| = ladj."""
    flow = _scrambled(EquivariantAugmentedFlow(n, d, transform=transform, scale=1.5, **TINY))
    x, a = _points(flow, 4)
    zx, za, ladj = flow.to_latent(x, a)
    x2, a2, inv_ladj = flow.to_data(zx, za)
    assert torch.allclose(zx.mean(1), torch.zeros(4, d), atol=1e-12)
    assert torch.allclose(x2, x, atol=1e-9) and torch.allclose(a2, a, atol=1e-9)
    assert torch.allclose(inv_ladj, -ladj, atol=1e-9)
    assert ladj.abs().max() > 0.01  # the scrambled flow is not volume preserving

    helmert = helmert_basis(n)
    free = (n - 1) * d

    def in_coordinates(v: torch.Tensor) -> torch.Tensor:
        xx = torch.einsum("kn,kd->nd", helmert, v[:free].reshape(n - 1, d))[None]
        z1, z2, _ = flow.to_latent(xx, v[free:].reshape(1, n, d))
        return torch.cat([torch.einsum("kn,nd->kd", helmert, z1[0]).reshape(-1), z2.reshape(-1)])

    for i in range(len(x)):
        v = torch.cat([torch.einsum("kn,nd->kd", helmert, x[i]).reshape(-1), a[i].reshape(-1)])
        jac = torch.autograd.functional.jacobian(in_coordinates, v)
        assert jac.shape == ((2 * n - 1) * d, (2 * n - 1) * d)
        assert abs(float(torch.linalg.slogdet(jac)[1] - ladj[i].detach())) < 1e-8


@pytest.mark.parametrize("n,d", SYSTEMS)
def test_rotation_translation_permutation_equivariance_and_invariant_density(float64, n, d):
    flow = _scrambled(EquivariantAugmentedFlow(n, d, transform="smooth", **TINY))
    x, a = _points(flow, 6)
    zx, za, _ = flow.to_latent(x, a)
    r, shift, perm = _rotation(d), torch.randn(1, 1, d), torch.randperm(n)
    moved = flow.join(x[:, perm] @ r + shift, a[:, perm] @ r + shift)
    zx2, za2, _ = flow.to_latent(*flow.split(moved))
    assert torch.allclose(zx2, zx[:, perm] @ r, atol=1e-9)
    assert torch.allclose(za2, za[:, perm] @ r, atol=1e-9)
    log_q = flow.joint_log_prob(flow.join(x, a))
    assert torch.allclose(flow.joint_log_prob(moved), log_q, atol=1e-9)
    # and the generative direction: rotated latents give rotated samples
    x3, a3, _ = flow.to_data(zx @ r, za @ r)
    assert torch.allclose(x3, x @ r, atol=1e-8) and torch.allclose(a3, a @ r, atol=1e-8)


def test_samples_are_mean_free_with_consistent_log_q_and_every_parameter_gets_a_gradient(float64):
    flow = _scrambled(EquivariantAugmentedFlow(4, 2, transform="smooth", **TINY))
    joint, log_q = flow.joint_sample_and_log_prob(16)
    x = joint[:, :8].reshape(16, 4, 2)
    assert torch.allclose(x.mean(1), torch.zeros(16, 2), atol=1e-10)
    assert torch.allclose(flow.joint_log_prob(joint.detach()), log_q, atol=1e-8)
    log_q.sum().backward()  # through the root-finding inverse (implicit gradients)
    missing = [name for name, p in flow.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_importance_sampled_marginal_is_exact_at_the_identity_flow(float64):
    """With identity blocks q(x, a) = N(x)·π(a|x), so every importance weight equals N(x)."""
    flow = EquivariantAugmentedFlow(4, 2, transform="affine", scale=1.3, **TINY)
    x, _ = _points(flow, 10)
    expected = (-0.5 * (x / 1.3).pow(2).sum((1, 2)) - 0.5 * 6 * math.log(2 * math.pi * 1.3 ** 2))
    assert torch.allclose(flow.log_prob(x.reshape(10, 8) + 5.0, n_importance=3), expected, atol=1e-10)


def test_joint_and_importance_sampled_marginal_densities_are_normalised(float64):
    """∫ q(x, a) = 1 (Monte Carlo under the base) and ∫ q(x) dx_V = 1 (two particles in 2-D
    have a 2-dimensional zero-CoM plane: a midpoint grid of its Helmert coordinates; the
    IS estimate is unbiased for q, and the grid avoids x₁ = x₂, where no frame exists).
    A wrong constant (2^{d/2}, N^{d/2}) or a wrong ladj sign would be off by a factor ≥ 2."""
    flow = _scrambled(EquivariantAugmentedFlow(2, 2, transform="affine", scale=1.0, **TINY), 0.02)
    with torch.no_grad():
        zx, za = _points(flow, 4000)
        ratio = (flow.joint_log_prob(flow.join(zx, za)) - flow.base_log_prob(zx, za)).exp()
        assert abs(float(ratio.mean()) - 1.0) < 4 * float(ratio.std()) / math.sqrt(4000) + 1e-3
        h = 0.25
        grid = torch.arange(-5.0 + h / 2, 5.0, h)
        y = torch.cartesian_prod(grid, grid)
        x = torch.einsum("kn,bkd->bnd", helmert_basis(2), y[:, None, :]).reshape(-1, 4)
        total = float(flow.log_prob(x, n_importance=8).exp().sum()) * h * h
    assert abs(total - 1.0) < 0.05, total


def test_bad_construction_is_refused():
    with pytest.raises(FlowforceError, match="spatial_dim 2 or 3"):
        EquivariantAugmentedFlow(2, 3)
    with pytest.raises(FlowforceError, match="valid names"):
        EquivariantAugmentedFlow(4, 2, transform="cubic")


# -- samplers and CLI ------------------------------------------------------------------------
def test_reverse_kl_steps_lower_the_loss_of_the_equivariant_flow_on_dw4(tmp_path):
    target = get_target("dw4")
    method = get_method("reverse-kl")
    opts = dict(flow="equivariant", n_layers=2, hidden=8, egnn_layers=1, n_components=3, transform="affine",
                batch_size=64, steps=25, lr=1e-2, log_every=1, checkpoint_every=100)
    model = method.build(target, opts)
    summary = method.train(model, target, opts, tmp_path / "r.ckpt", progress=False, log_path=tmp_path / "r.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert summary["steps"] == 25 and summary["energy_evaluations"] == 25 * 64
    assert last < first - 1.0, (first, last)


def test_the_energy_cut_acts_on_the_target_energy_only_for_the_augmented_flow(float64):
    """Above the cut, u_c grows like log u; were the cut applied to u(x) − log π(a|x), spreading
    the auxiliary a would cost only logarithmically and reverse KL would spread it without bound
    (measured on LJ-13). The loss energy must grow linearly in −log π at any u."""
    from openmm_flowforce.samplers.flow_training import auxiliary_energy, training_pair
    from openmm_flowforce.samplers.reverse_kl import cut_energy, regularised_energy

    flow = EquivariantAugmentedFlow(4, 2)
    huge = lambda x: 1e6 + x.pow(2).sum(-1)  # noqa: E731  a target energy far above the cut
    view, joint_energy = training_pair(flow, huge)
    x, a = _points(flow, 8)
    near, far = torch.cat([x, a], 1).reshape(8, -1), torch.cat([x, x + 10 * (a - x)], 1).reshape(8, -1)
    loss_energy = cut_energy(joint_energy, 100.0, auxiliary_energy(flow))
    extra_aux = -flow.log_aux(*flow.split(far)) + flow.log_aux(*flow.split(near))
    torch.testing.assert_close(loss_energy(far) - loss_energy(near), extra_aux)  # linear in −log π
    assert (extra_aux > 100).all()
    # the target's part is cut exactly as for a plain flow
    torch.testing.assert_close(loss_energy(near) + flow.log_aux(*flow.split(near)),
                               regularised_energy(huge(x.reshape(8, -1)), 100.0))
    assert auxiliary_energy(torch.nn.Linear(1, 1)) is None


def test_fab_and_the_cli_run_the_equivariant_flow_end_to_end(tmp_path):
    out = tmp_path / "fab.ckpt"
    config = tmp_path / "fab.yaml"
    config.write_text("options: {n_layers: 2, hidden: 8, egnn_layers: 1, n_components: 3, batch_size: 16, "
                      "min_buffer: 32, buffer_size: 64, n_updates: 2, n_intermediate: 1, n_leapfrog: 2, "
                      "n_importance: 4}\n")
    assert main(["sampler", "train", "--target", "dw4", "--method", "fab", "--flow", "equivariant", "--out",
                 str(out), "--steps", "2", "--config", str(config), "--quiet"]) == 0
    assert main(["sampler", "sample", str(out), "-n", "40", "--out", str(tmp_path / "x.npy")]) == 0
    assert main(["sampler", "evaluate", str(out), "--reference", str(tmp_path / "x.npy"), "-n", "20",
                 "--no-align", "--out", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["method"] == "fab" and math.isfinite(report["nll"]) and 0 < report["ess"] <= 1
    # the flow option is checked like any other, and equivariant-only options need it
    assert main(["sampler", "train", "--target", "dw4", "--method", "fab", "--flow", "cubic", "--out",
                 str(tmp_path / "bad.ckpt")]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("options: {egnn_layers: 2}\n")
    assert main(["sampler", "train", "--target", "dw4", "--method", "reverse-kl", "--out",
                 str(tmp_path / "bad.ckpt"), "--config", str(bad)]) == 2
    assert not (tmp_path / "bad.ckpt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [("fab", dict(n_intermediate=1, min_buffer=32, buffer_size=64,
                                                     n_updates=2)),
                                        ("reverse-kl", {})])
def test_interrupted_and_resumed_equivariant_run_equals_an_uninterrupted_one(tmp_path, name, extra):
    target = get_target("dw4")
    method = get_method(name)
    opts = dict(flow="equivariant", n_layers=2, hidden=8, egnn_layers=1, n_components=3, batch_size=16, steps=4,
                log_every=1, checkpoint_every=2, **extra)
    straight = method.build(target, opts)
    method.train(straight, target, opts, tmp_path / "a.ckpt", progress=False)
    half = method.build(target, opts)
    method.train(half, target, {**opts, "steps": 2}, tmp_path / "b.ckpt", progress=False)
    resumed = method.build(target, opts)
    summary = method.train(resumed, target, opts, tmp_path / "b.ckpt", progress=False)
    assert summary["resumed_from"] == 2
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
