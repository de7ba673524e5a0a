"""Sample-quality metrics: Wasserstein distances, interatomic-distance TV, ESS, log Z."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from openmm_flowforce.analysis import (aligned_cost_matrix, ess, interatomic_distances, log_partition,
                                       tv_distance_histograms, w2_energy, w2_samples, wasserstein_samples)
from openmm_flowforce.targets import get_target


def _rotate_reflect_permute(x: np.ndarray, n_particles: int, spatial_dim: int, rng,
                            shuffle: bool = True) -> np.ndarray:
    """Move every configuration rigidly (orthogonal map + translation), permute its
    particles and (``shuffle``) the order of the samples."""
    p = x.reshape(len(x), n_particles, spatial_dim)
    out = np.empty_like(p)
    for k in range(len(p)):
        q, r = np.linalg.qr(rng.normal(size=(spatial_dim, spatial_dim)))
        q = q * np.sign(np.diag(r))  # Haar-random orthogonal, reflections included
        out[k] = (p[k] @ q.T + rng.normal(size=spatial_dim))[rng.permutation(n_particles)]
    out = out.reshape(x.shape)
    return out[rng.permutation(len(x))] if shuffle else out


def test_w2_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(200, 5))
    assert w2_samples(x, x) == 0.0
    assert w2_samples(x, x[::-1].copy()) == 0.0
    assert wasserstein_samples(torch.from_numpy(x), x, p=1) == 0.0


@pytest.mark.parametrize("dim", [1, 7])
@pytest.mark.parametrize("p", [1, 2])
def test_w_of_a_shifted_set_is_the_shift(dim, p):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, dim))
    shift = rng.normal(size=dim)
    y = (x + shift)[rng.permutation(300)]
    x_in = x[:, 0] if dim == 1 else x  # 1-D samples may be given as (n,)
    assert wasserstein_samples(x_in, y, p=p) == pytest.approx(np.linalg.norm(shift), rel=1e-10)


def test_w2_is_the_optimal_assignment_brute_force():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    best = min(np.mean([np.sum((x[i] - y[j]) ** 2) for i, j in enumerate(perm)])
               for perm in itertools.permutations(range(6)))
    assert w2_samples(x, y) == pytest.approx(math.sqrt(best), rel=1e-12)
    best1 = min(np.mean([np.linalg.norm(x[i] - y[j]) for i, j in enumerate(perm)])
                for perm in itertools.permutations(range(6)))
    assert wasserstein_samples(x, y, p=1) == pytest.approx(best1, rel=1e-12)


def test_w2_rejects_bad_input():
    x = np.zeros((10, 3))
    with pytest.raises(ValueError, match="same shape"):
        w2_samples(x, np.zeros((9, 3)))
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        wasserstein_samples(x, x, p=3)
    with pytest.raises(ValueError, match="needs n_particles and spatial_dim"):
        w2_samples(x, x, align=True)
    with pytest.raises(ValueError, match="non-finite"):
        w2_samples(np.full((10, 3), np.nan), x)


@pytest.mark.parametrize("n_particles, spatial_dim", [(13, 3), (4, 2)])
def test_alignment_removes_rotation_reflection_permutation_translation(n_particles, spatial_dim):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(12, n_particles * spatial_dim))
    y = _rotate_reflect_permute(x, n_particles, spatial_dim, rng)
    assert w2_samples(x, y) > 1.0
    assert w2_samples(x, y, align=True, n_particles=n_particles, spatial_dim=spatial_dim) < 1e-6


def test_aligned_cost_is_at_most_the_centred_distance_and_finds_noisy_copies():
    target = get_target("lj13")
    rng = np.random.default_rng(4)
    x = target.remove_mean(torch.from_numpy(rng.normal(size=(8, 39)))).numpy()
    y = target.remove_mean(torch.from_numpy(rng.normal(size=(7, 39)))).numpy()
    cost = aligned_cost_matrix(x, y, 13, 3)
    plain = ((x[:, None] - y[None]) ** 2).sum(-1)
    assert cost.shape == (8, 7) and (cost <= plain + 1e-9).all() and (cost >= 0).all()
    # A rigidly moved, permuted noisy copy: the optimum is at most the (centred) noise.
    noise = target.remove_mean(torch.from_numpy(0.05 * rng.normal(size=(8, 39)))).numpy()
    copies = _rotate_reflect_permute(x + noise, 13, 3, rng, shuffle=False)
    diagonal = np.diag(aligned_cost_matrix(x, copies, 13, 3))
    assert (diagonal <= (noise ** 2).sum(1) + 1e-9).all()
    assert w2_samples(x, copies, align=True, n_particles=13, spatial_dim=3) < 0.5 < w2_samples(x, copies)


def test_w2_energy():
    rng = np.random.default_rng(5)
    e1, e2 = rng.normal(0.0, 1.0, 200_000), rng.normal(1.5, 1.0, 200_000)
    assert w2_energy(e1, e2) == pytest.approx(1.5, abs=0.02)
    assert w2_energy(e1, e1[::-1] + 0.25) == pytest.approx(0.25, rel=1e-12)
    assert w2_energy(torch.from_numpy(e1[:500]), e2[:500]) == pytest.approx(
        w2_samples(e1[:500], e2[:500]), rel=1e-12)  # 1-D sorting = optimal assignment
    with pytest.raises(ValueError, match="equal counts"):
        w2_energy(e1[:10], e2[:11])


def test_tv_distance_histograms():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(300, 39))
    assert tv_distance_histograms(x, x, 13, 3) == 0.0
    grid = np.stack(np.meshgrid(*[np.arange(3.0)] * 3, indexing="ij"), -1).reshape(-1, 3)[:13]
    far = np.broadcast_to(grid.ravel(), (300, 39))  # every distance >= 1
    assert tv_distance_histograms(0.01 * x, far, 13, 3) == 1.0  # distances < 0.2: disjoint
    y = rng.normal(size=(300, 39))
    tv = tv_distance_histograms(x, y, 13, 3, bins=50)
    assert 0.0 < tv < 0.1
    # iDEM's convention: edges from the reference set only; x's distances outside are dropped.
    tv_ref = tv_distance_histograms(x, y, 13, 3, bins=200, edges_from="reference")
    edges = np.histogram_bin_edges(interatomic_distances(y, 13, 3), bins=200)
    assert tv_ref == tv_distance_histograms(x, y, 13, 3, bins=edges)
    with pytest.raises(ValueError, match="valid: both, reference"):
        tv_distance_histograms(x, y, 13, 3, edges_from="data")
    with pytest.raises(ValueError, match="n_particles"):
        tv_distance_histograms(x, y, 4, 3)


def test_ess():
    assert ess(np.zeros(100)) == pytest.approx(1.0)
    assert ess(np.r_[0.0, np.full(99, -np.inf)]) == pytest.approx(0.01)
    assert ess(torch.tensor([0.0, math.log(3.0)])) == pytest.approx(16 / 20)


def test_log_partition_with_the_target_as_proposal_is_exact():
    target = get_target("gmm40")
    x = target.sample(5000, generator=torch.Generator().manual_seed(7))
    log_w = -target.energy(x) - target.log_prob(x)  # log q = log p: every weight is 1
    log_z, se = log_partition(log_w)
    assert abs(log_z) < 1e-12 and se < 1e-12


def test_log_partition_wide_gaussian_proposal_is_within_three_standard_errors():
    target = get_target("gmm40")
    g = torch.Generator().manual_seed(8)
    n, scale = 200_000, 30.0
    x = scale * torch.randn(n, 2, generator=g, dtype=torch.float64)
    log_q = -0.5 * (x / scale).pow(2).sum(1) - 2 * math.log(scale) - math.log(2 * math.pi)
    log_z, se = log_partition(-target.energy(x) - log_q)
    assert 0 < se < 0.05
    assert abs(log_z) < 3 * se
    # The delta-method error matches the spread of independent estimates.
    estimates = []
    for seed in range(20):
        g = torch.Generator().manual_seed(100 + seed)
        x = scale * torch.randn(20_000, 2, generator=g, dtype=torch.float64)
        log_q = -0.5 * (x / scale).pow(2).sum(1) - 2 * math.log(scale) - math.log(2 * math.pi)
        estimates.append(log_partition(-target.energy(x) - log_q))
    spread = np.std([e for e, _ in estimates], ddof=1)
    assert 0.6 < spread / np.mean([s for _, s in estimates]) < 1.6


def test_log_partition_rejects_bad_weights():
    with pytest.raises(ValueError, match="at least 2"):
        log_partition([0.0])
    with pytest.raises(ValueError, match="NaN"):
        log_partition([0.0, float("nan")])
    with pytest.raises(ValueError, match="all weights are zero"):
        log_partition([-np.inf, -np.inf])
    log_z, _ = log_partition([0.0, -np.inf])  # a zero weight counts in n
    assert log_z == pytest.approx(-math.log(2))
