"""Toy energy targets of the energy-only sampler papers: GMM-40, DW-4, LJ-13, LJ-55.

Every target here takes *flat* positions ``x`` of shape ``(B, dim)`` (particles are
``(x1, y1, x2, y2, ...)`` for the particle systems) and returns the reduced energy
``u(x)`` of shape ``(B,)`` at kT = 1, in ``x``'s dtype and device. ``log_prob = −energy``
(unnormalised except for GMM-40, whose log density is normalised, so log Z = 0) and
``score(x) = −∇u`` by autograd. Look them up by name:
``get_target("gmm40" | "dw4" | "lj13" | "lj55")``.

The formulas are those of the iDEM authors' code (Akhound-Sadegh et al. 2024, "Iterated
Denoising Energy Matching", arXiv 2402.06121; repository jarridrb/DEM, ``dem/energies``),
which takes GMM-40 from FAB (Midgley et al. 2023, arXiv 2208.01893; fab-torch
``fab/target_distributions/gmm.py``) and DW-4 / LJ from bgflow
(``MultiDoubleWellPotential``, ``LennardJonesPotential``). Each class states its formula.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import FlowforceError

Tensor = torch.Tensor

__all__ = ["GaussianMixture40", "MultiDoubleWell", "LennardJonesCluster", "pairwise_distances", "remove_mean"]


def remove_mean(x: Tensor, n_particles: int, spatial_dim: int) -> Tensor:
    """Subtract each configuration's centre of mass (equal masses).

    Args:
        x: flat positions ``(B, n_particles·spatial_dim)``.

    Returns:
        mean-free positions, same shape as ``x``.
    """
    p = x.reshape(-1, n_particles, spatial_dim)
    return (p - p.mean(dim=1, keepdim=True)).reshape(x.shape)


def pairwise_distances(x: Tensor, n_particles: int, spatial_dim: int, softening: float = 0.0) -> Tensor:
    """Distances of the unordered pairs i < j, ``sqrt(|x_i − x_j|² + softening)``.

    Args:
        x: flat positions ``(B, n_particles·spatial_dim)``.
        softening: added to the squared distance (bgflow's ``eps``; 0 gives plain distances).

    Returns:
        ``(B, n_particles·(n_particles−1)/2)`` in the order of ``torch.triu_indices(N, N, 1)``.
    """
    p = x.reshape(-1, n_particles, spatial_dim)
    i, j = torch.triu_indices(n_particles, n_particles, offset=1, device=x.device)
    diff = p[:, i] - p[:, j]
    return (diff.pow(2).sum(-1) + softening).sqrt()


class _EnergyTarget:
    """``log_prob`` and ``score`` from ``energy``; subclasses set ``dim`` and ``energy``."""

    dim: int

    def energy(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        return self.energy(x)

    def log_prob(self, x: Tensor) -> Tensor:
        """−u(x), shape ``(B,)`` (unnormalised unless the class says otherwise)."""
        return -self.energy(x)

    def score(self, x: Tensor, create_graph: bool = False) -> Tensor:
        """−∇u(x), shape ``(B, dim)``, by autograd.

        With ``create_graph=True`` the result stays differentiable in ``x`` (and in what
        produced ``x``); otherwise ``x`` is detached first.
        """
        with torch.enable_grad():
            if not create_graph:
                x = x.detach().requires_grad_(True)
            elif not x.requires_grad:
                x = x.requires_grad_(True)
            (grad,) = torch.autograd.grad(self.energy(x).sum(), x, create_graph=create_graph)
        return -grad

    def _check(self, x: Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a floating-point torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must have a floating dtype, got {x.dtype}")
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise FlowforceError(f"{type(self).__name__} takes flat positions of shape (B, {self.dim}), "
                                 f"got {tuple(x.shape)}")


class GaussianMixture40(_EnergyTarget):
    """GMM-40: an equal-weight mixture of 40 axis-aligned 2-D Gaussians (FAB's "GMM").

    .. math::
        \\log p(x) = \\log \\frac{1}{40}\\sum_{k=1}^{40} \\mathcal{N}(x; \\mu_k, \\sigma^2 I_2),
        \\qquad \\sigma = \\operatorname{softplus}(1) = \\log(1 + e) ≈ 1.3133,

    with means ``μ = (U − 0.5)·2·40``, ``U ~ Uniform[0, 1)^{40×2}``, i.e. uniform in
    [−40, 40]². ``u = −log p`` is normalised: log Z = 0 exactly.

    Means. The iDEM code calls ``torch.manual_seed(0)`` and then fab-torch's
    ``GMM(dim=2, n_mixes=40, loc_scaling=40, log_var_scaling=1.0)``, whose first random
    call is ``torch.rand((40, 2))`` on the CPU generator. We draw the same numbers from a
    private ``torch.Generator`` seeded with ``seed`` (default 0) — the CPU Mersenne
    Twister stream, reproducible across torch versions — so with the default seed our
    means equal theirs bit for bit (float32 values, then cast), without touching the
    global RNG.

    Differences from fab-torch, on purpose: fab-torch sets ``log p = −inf`` where
    ``log p < −1e4`` (a guard for its replay buffer); here the density is the plain
    mixture everywhere, so the score stays finite far from the modes.

    Reference: Midgley et al. 2023, arXiv 2208.01893 (FAB); Akhound-Sadegh et al. 2024,
    arXiv 2402.06121 (iDEM, same target).
    """

    dim = 2
    n_components = 40

    def __init__(self, seed: int = 0, loc_scaling: float = 40.0, log_var_scaling: float = 1.0):
        generator = torch.Generator().manual_seed(int(seed))
        # float32 as in the reference code (torch's default dtype there): a float64 draw would
        # give other numbers from the same seed, and the means must not depend on the caller's
        # default dtype.
        unit = torch.rand((self.n_components, self.dim), generator=generator, dtype=torch.float32)
        #: Component means, (40, 2) float64.
        self.means = ((unit - 0.5) * 2 * loc_scaling).double()
        #: Per-axis standard deviation softplus(log_var_scaling), the same for all components.
        self.std = float(F.softplus(torch.tensor(float(log_var_scaling), dtype=torch.float64)))
        self.seed = int(seed)
        #: log Z of exp(−u): 0, because u = −log p with p normalised.
        self.log_z = 0.0

    def energy(self, x: Tensor) -> Tensor:
        """u(x) = −log p(x), shape ``(B,)``."""
        self._check(x)
        means = self.means.to(device=x.device, dtype=x.dtype)
        z = (x[:, None, :] - means[None]) / self.std  # (B, K, 2)
        log_components = (-0.5 * z.pow(2).sum(-1)
                          - self.dim * (math.log(self.std) + 0.5 * math.log(2 * math.pi)))
        return -(torch.logsumexp(log_components, dim=1) - math.log(self.n_components))

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
               device: torch.device | str | None = None) -> Tensor:
        """Exact samples ``(n, 2)``: a uniform component, then its Gaussian."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise FlowforceError(f"n must be a non-negative integer, got {n!r}")
        k = torch.randint(self.n_components, (n,), generator=generator)
        noise = torch.randn((n, self.dim), generator=generator, dtype=torch.float64)
        return (self.means[k] + self.std * noise).to(device=device, dtype=dtype)


class MultiDoubleWell(_EnergyTarget):
    """DW-4 (and its kin): particles with a double-well pair potential (bgflow's
    ``MultiDoubleWellPotential``).

    .. math::
        u(x) = \\sum_{i<j} \\left[a (d_{ij} − d_0)^4 + b (d_{ij} − d_0)^2 + c\\right],
        \\qquad d_{ij} = |x_i − x_j|,

    with the iDEM constants a = 0.9, b = −4, c = 0, d₀ = 4 (``dem/energies/
    multi_double_well_energy.py``; bgflow sums the unordered pairs, no softening).
    Only distances enter, so u is invariant under translations, rotations, reflections
    and permutations; the reference data are compared after :meth:`remove_mean`.

    Reference: Köhler, Klein, Noé 2020, arXiv 2006.02425 (DW-4); iDEM arXiv 2402.06121.
    """

    def __init__(self, n_particles: int = 4, spatial_dim: int = 2, a: float = 0.9, b: float = -4.0,
                 c: float = 0.0, offset: float = 4.0):
        self.n_particles = int(n_particles)
        self.spatial_dim = int(spatial_dim)
        self.dim = self.n_particles * self.spatial_dim
        self.a, self.b, self.c, self.offset = float(a), float(b), float(c), float(offset)

    def energy(self, x: Tensor) -> Tensor:
        """u(x), shape ``(B,)``."""
        self._check(x)
        d = pairwise_distances(x, self.n_particles, self.spatial_dim) - self.offset
        return (self.a * d.pow(4) + self.b * d.pow(2) + self.c).sum(-1)

    def remove_mean(self, x: Tensor) -> Tensor:
        """Mean-free copy of flat positions ``(B, dim)``."""
        return remove_mean(x, self.n_particles, self.spatial_dim)


class LennardJonesCluster(_EnergyTarget):
    """LJ-n: a Lennard-Jones cluster held together by a harmonic trap on the centre of mass
    frame (bgflow's ``LennardJonesPotential`` as configured by iDEM).

    .. math::
        u(x) = 2 \\sum_{i<j} \\left[\\left(\\frac{1}{r_{ij}}\\right)^{12}
               − 2\\left(\\frac{1}{r_{ij}}\\right)^{6}\\right]
               + \\frac{1}{2} \\sum_i |x_i − \\bar x|^2,
        \\qquad r_{ij} = \\sqrt{|x_i − x_j|^2 + 10^{-6}}.

    ε = r_min = 1, so each pair has its minimum −1 at r = 1 (counted twice). The factor 2
    is not a physical choice but the reference code's: it sums over *ordered* pairs
    i ≠ j (bgflow ``distance_vectors``) with ``energy_factor = 1`` (iDEM's configs for
    LJ-13 and LJ-55 keep the default). The 10⁻⁶ inside the square root is bgflow's
    ``distances_from_vectors`` regulariser, kept so energies match the reference code
    (pass ``softening=0`` for the textbook r). Energies are not clipped: the iDEM code has
    the clip ``torch.clip(lj, −1e4, 1e4)`` commented out in every version we read; it
    clips the *estimated scores* in its training loop instead, which is sampler business.

    u is invariant under translations (the trap acts on ``x − x̄``), rotations,
    reflections and permutations; the reference samples are mean-free.

    Reference: Köhler, Klein, Noé 2020, arXiv 2006.02425; Klein, Krämer, Noé 2023,
    arXiv 2306.15030 (data); iDEM arXiv 2402.06121.
    """

    def __init__(self, n_particles: int = 13, spatial_dim: int = 3, softening: float = 1e-6,
                 oscillator_scale: float = 1.0):
        if n_particles < 2:
            raise FlowforceError(f"a Lennard-Jones cluster needs at least 2 particles, got {n_particles}")
        self.n_particles = int(n_particles)
        self.spatial_dim = int(spatial_dim)
        self.dim = self.n_particles * self.spatial_dim
        self.softening = float(softening)
        self.oscillator_scale = float(oscillator_scale)

    def energy(self, x: Tensor) -> Tensor:
        """u(x), shape ``(B,)``."""
        self._check(x)
        r = pairwise_distances(x, self.n_particles, self.spatial_dim, self.softening)
        inv6 = r.pow(-6)
        lj = 2.0 * (inv6 * inv6 - 2.0 * inv6).sum(-1)
        trap = 0.5 * remove_mean(x, self.n_particles, self.spatial_dim).pow(2).sum(-1)
        return lj + self.oscillator_scale * trap

    def remove_mean(self, x: Tensor) -> Tensor:
        """Mean-free copy of flat positions ``(B, dim)``."""
        return remove_mean(x, self.n_particles, self.spatial_dim)
