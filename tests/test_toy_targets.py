"""Toy targets gmm40, dw4, lj13, lj55: hand-computed energies, autograd scores against
finite differences, invariances, and the shared reference sample sets."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from openmm_flowforce.targets import get_target, target_names
from openmm_flowforce.targets.toys import GaussianMixture40, LennardJonesCluster, MultiDoubleWell

#: The iDEM authors' reference sets: $FLOWFORCE_SHARED_DATA, else ../shared/data next to the repository.
SHARED_DATA = Path(os.environ.get("FLOWFORCE_SHARED_DATA")
                   or Path(__file__).resolve().parent.parent.parent / "shared" / "data")
TOYS = ("gmm40", "dw4", "lj13", "lj55")


def _shared(relative: str) -> np.ndarray:
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"shared reference data not found at {path}")
    return np.load(path)


def _configurations(name: str, n: int, seed: int = 0) -> torch.Tensor:
    """Well-separated random configurations (float64) for each target."""
    g = torch.Generator().manual_seed(seed)
    target = get_target(name)
    if name == "gmm40":
        return target.sample(n, generator=g)
    side = 4.0 if name == "dw4" else 1.1
    # Jittered grid: no two particles closer than side/2.
    from itertools import product
    k = math.ceil(target.n_particles ** (1 / target.spatial_dim))
    sites = torch.tensor(list(product(range(k), repeat=target.spatial_dim)), dtype=torch.float64)[:target.n_particles]
    x = sites[None] * side + 0.1 * side * torch.randn(n, target.n_particles, target.spatial_dim, generator=g,
                                                       dtype=torch.float64)
    return x.reshape(n, -1)


def _random_orthogonal(d: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def test_registry_names_and_unknown_name():
    assert set(TOYS) <= set(target_names())
    with pytest.raises(ValueError, match="valid names: .*dw4.*gmm40.*lj13.*lj55"):
        get_target("lj7")
    with pytest.raises(ValueError, match="fixes n_particles=13"):
        get_target("lj13", n_particles=55)
    assert isinstance(get_target("lj55"), LennardJonesCluster) and get_target("lj55").dim == 165
    assert (get_target("dw4").dim, get_target("dw4").n_particles, get_target("dw4").spatial_dim) == (8, 4, 2)
    assert (get_target("lj13").dim, get_target("lj13").spatial_dim) == (39, 3)


@pytest.mark.parametrize("name", TOYS)
def test_shapes_log_prob_and_bad_input(name):
    target = get_target(name)
    x = _configurations(name, 5)
    u = target.energy(x)
    assert u.shape == (5,) and u.dtype == torch.float64
    torch.testing.assert_close(target.log_prob(x), -u)
    assert target.score(x).shape == (5, target.dim)
    assert target.energy(x.float()).dtype == torch.float32
    with pytest.raises(ValueError, match=f"\\(B, {target.dim}\\)"):
        target.energy(x[:, :-1])
    with pytest.raises(TypeError):
        target.energy(x.numpy())


@pytest.mark.parametrize("name", TOYS)
def test_score_is_minus_gradient_finite_differences(name):
    target = get_target(name)
    x = _configurations(name, 4, seed=1)
    score = target.score(x)
    g = torch.Generator().manual_seed(2)
    h = 1e-5
    for _ in range(3):
        v = torch.randn(x.shape, generator=g, dtype=torch.float64)
        v = v / v.norm(dim=1, keepdim=True)
        slope = (target.energy(x + h * v) - target.energy(x - h * v)) / (2 * h)
        torch.testing.assert_close(slope, -(score * v).sum(1), rtol=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(target.energy, (x[:2].clone().requires_grad_(True),))


def test_score_create_graph_is_differentiable():
    target = get_target("lj13")
    x = _configurations("lj13", 2).requires_grad_(True)
    s = target.score(x, create_graph=True)
    (hvp,) = torch.autograd.grad(s.pow(2).sum(), x)
    assert torch.isfinite(hvp).all() and hvp.abs().sum() > 0


@pytest.mark.parametrize("name", ("dw4", "lj13", "lj55"))
def test_invariances(name):
    target = get_target(name)
    n, d = target.n_particles, target.spatial_dim
    x = _configurations(name, 3, seed=3)
    g = torch.Generator().manual_seed(4)
    p = x.reshape(3, n, d)
    q = _random_orthogonal(d, g)
    moved = (p @ q.T + torch.randn(d, generator=g, dtype=torch.float64))[:, torch.randperm(n, generator=g)]
    torch.testing.assert_close(target.energy(moved.reshape(3, -1)), target.energy(x), rtol=1e-10, atol=1e-9)
    centred = target.remove_mean(x)
    assert centred.reshape(3, n, d).mean(1).abs().max() < 1e-12


def test_gmm40_means_match_the_reference_recipe_and_log_z_is_zero():
    target = get_target("gmm40")
    # iDEM: torch.manual_seed(0), then fab-torch draws torch.rand((40, 2)) first.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        expected = (torch.rand((40, 2), dtype=torch.float32) - 0.5) * 2 * 40
    assert torch.equal(target.means, expected.double())
    assert target.means.abs().max() <= 40
    assert target.std == pytest.approx(math.log1p(math.e), rel=1e-15)
    # Normalised: ∫ exp(−u) over a box that holds every mode (±40 ± 10σ) is 1.
    grid = torch.linspace(-55.0, 55.0, 441, dtype=torch.float64)  # spacing 0.25 ≈ σ/5
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    density = torch.exp(-target.energy(torch.stack([xx.ravel(), yy.ravel()], 1)))
    assert float(density.sum() * (grid[1] - grid[0]) ** 2) == pytest.approx(1.0, abs=1e-6)
    # Independent evaluation of the mixture density at a few points.
    x = torch.tensor([[0.0, 0.0], [-32.9, -29.4], [10.0, -5.0]], dtype=torch.float64)
    sq = ((x[:, None] - target.means[None]) ** 2).sum(-1)
    mixture = (torch.exp(-sq / (2 * target.std ** 2)) / (2 * math.pi * target.std ** 2)).mean(1)
    torch.testing.assert_close(target.energy(x), -torch.log(mixture), rtol=1e-12, atol=1e-12)


def test_gmm40_exact_samples_have_the_mixture_moments():
    target = GaussianMixture40()
    x = target.sample(200_000, generator=torch.Generator().manual_seed(5))
    mean = target.means.mean(0)
    cov = torch.cov(target.means.T, correction=0) + target.std ** 2 * torch.eye(2, dtype=torch.float64)
    se = (torch.diagonal(cov) / len(x)).sqrt()
    assert ((x.mean(0) - mean).abs() < 4 * se).all()
    torch.testing.assert_close(torch.cov(x.T), cov, rtol=0.02, atol=0.0)
    assert target.sample(0).shape == (0, 2)
    with pytest.raises(ValueError, match="non-negative integer"):
        target.sample(-1)


def test_dw4_square_of_side_four():
    # Side 4: the four edges sit at d0 = 4 (energy 0); the two diagonals at 4√2.
    target = get_target("dw4")
    x = torch.tensor([[0.0, 0.0, 4.0, 0.0, 4.0, 4.0, 0.0, 4.0]], dtype=torch.float64)
    t = 4 * math.sqrt(2) - 4
    assert float(target.energy(x)) == pytest.approx(2 * (0.9 * t ** 4 - 4 * t ** 2), rel=1e-12)
    assert float(target.energy(x)) == pytest.approx(-8.396643, abs=1e-6)


def test_double_well_pair_minimum():
    # a t⁴ + b t² is smallest at t² = −b/(2a) = 20/9 with value −b²/(4a) = −40/9; zero force there.
    target = MultiDoubleWell(n_particles=2, spatial_dim=2)
    x = torch.tensor([[0.0, 0.0, 4 + math.sqrt(20 / 9), 0.0]], dtype=torch.float64)
    assert float(target.energy(x)) == pytest.approx(-40 / 9, rel=1e-12)
    assert target.score(x).abs().max() < 1e-12


@pytest.mark.parametrize("softening, tol", [(0.0, 1e-12), (1e-6, 1e-5)])
def test_lennard_jones_dimer(softening, tol):
    target = LennardJonesCluster(n_particles=2, spatial_dim=3, softening=softening)
    # r = 1: each pair's well depth −1, counted twice (ordered pairs); trap ½·2·(r/2)² = r²/4.
    x = torch.tensor([[-0.5, 0, 0, 0.5, 0, 0]], dtype=torch.float64)
    assert float(target.energy(x)) == pytest.approx(-2.0 + 0.25, abs=tol)
    # At r = 1 the LJ force vanishes: only the trap pulls, −∇u = −(x_i − x̄).
    torch.testing.assert_close(target.score(x), torch.tensor([[0.5, 0, 0, -0.5, 0, 0]], dtype=torch.float64),
                               atol=10 * tol, rtol=0)
    # r = 2^(1/6): r⁻⁶ = 1/2, so 2·(1/4 − 1) = −3/2, plus r²/4.
    r = 2 ** (1 / 6)
    x = torch.tensor([[0, 0, 0, 0, r, 0]], dtype=torch.float64)
    assert float(target.energy(x)) == pytest.approx(-1.5 + r * r / 4, abs=tol)


def test_lennard_jones_matches_ordered_pair_sum():
    target = get_target("lj13")
    x = _configurations("lj13", 3, seed=6)
    p = x.reshape(3, 13, 3)
    r = torch.cdist(p, p).pow(2).add(1e-6).sqrt()
    off_diagonal = ~torch.eye(13, dtype=torch.bool)
    lj = (r.pow(-12) - 2 * r.pow(-6))[:, off_diagonal].sum(-1)
    trap = 0.5 * (p - p.mean(1, keepdim=True)).pow(2).sum((1, 2))
    torch.testing.assert_close(target.energy(x), lj + trap, rtol=1e-12, atol=1e-10)


def _half_virial(target, x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x * -target.score(x)).sum(-1)


def test_lj13_reference_set_energy_and_equipartition():
    target = get_target("lj13")
    x = torch.from_numpy(_shared("lj13/test.npy")).double()
    assert x.shape == (10000, 39)
    assert target.remove_mean(x).sub(x).abs().max() < 1e-5  # stored mean-free
    u = target.energy(x)
    assert float(u.mean()) == pytest.approx(-43.13, abs=0.3)  # ±4 standard errors
    # On the mean-free subspace (dim 36): <½ x·∇u> = (N − 1)·d/2 = 18 at kT = 1.
    half = _half_virial(target, x)
    se = float(half.std() / math.sqrt(len(half)))
    assert abs(float(half.mean()) - 18.0) < 3 * se
    assert se < 0.4


def test_dw4_reference_set_is_mean_free_after_centring_and_slightly_cold():
    target = get_target("dw4")
    raw = torch.from_numpy(_shared("dw4/test.npy")).double()
    assert raw.reshape(-1, 4, 2).mean(1).abs().max() > 1  # not stored mean-free (README)
    x = target.remove_mean(raw)
    torch.testing.assert_close(target.energy(x), target.energy(raw))
    assert float(target.energy(x).mean()) == pytest.approx(-22.45, abs=0.1)  # sd 1.9 → SE 0.02
    # Equipartition would give (N − 1)·d/2 = 3; the 100k training set resolves the ~9% deficit
    # the README reports (0.915 ± 0.02).
    half = _half_virial(target, target.remove_mean(torch.from_numpy(_shared("dw4/train.npy")).double()))
    ratio = float(half.mean()) / 3.0
    assert 0.85 < ratio < 0.97
