"""What SNF and CRAFT share: a Gaussian prior on ℝ^D (or on the zero-centre-of-mass
hyperplane of a particle system) and a bijection ℝ^D → ℝ^D built from a cube coupling flow.

* :class:`GaussianPrior`: N(0, s²·I) on the free coordinates, ``log_prob``, ``energy``
  (= −log_prob, the λ = 0 end of the annealing paths), ``sample`` and ``project`` (the
  orthogonal projection onto the hyperplane, used to keep noise and drifts in it).
* :class:`RealCoupling`: ``y = s·Φ⁻¹(c(Φ(x/s)))`` per free coordinate, ``c`` a
  :class:`~openmm_flowforce.flows.CouplingFlow` on the unit cube. The forward map is
  analytic (the cube flow's ``to_latent``); the inverse uses its root finding. With a
  ``"spline"`` cube flow at its identity initialisation the map is exactly the identity
  (``"smooth"``: close to it), so an untrained CRAFT is exactly SMC/AIS. On the
  free coordinates ``t = x/s``, ``t' = y/s``,

      log|det ∂y/∂x| = log|det ∂c/∂u| + Σ_i log φ(t_i) − Σ_i log φ(t'_i),

  the scale cancelling. Φ saturates at |t| ≈ 8 in float64, so the map is a bijection
  only for |x_i| ≲ 8·s (the same range as :class:`~openmm_flowforce.flows.RealFlow`).

Particle systems: the free coordinates are the Helmert coordinates of
:func:`~openmm_flowforce.flows.helmert_basis` (an isometry of the hyperplane onto
ℝ^{(N−1)d}), so densities are with respect to the Lebesgue measure on the hyperplane, as
for :class:`~openmm_flowforce.flows.RealFlow`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import FlowforceError
from ..flows import CouplingFlow, helmert_basis

Tensor = torch.Tensor

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class _FreeCoordinates(nn.Module):
    """Flat positions ``(B, dim)`` ↔ free coordinates ``(B, free_dim)`` (Helmert for particles)."""

    def __init__(self, dim: int, n_particles: int | None = None, spatial_dim: int | None = None):
        super().__init__()
        if (n_particles is None) != (spatial_dim is None):
            raise FlowforceError("give both n_particles and spatial_dim (mean-free particle system) or neither")
        self.dim = int(dim)
        self.mean_free = n_particles is not None
        if self.mean_free and (n_particles < 2 or n_particles * spatial_dim != dim):
            raise FlowforceError(f"n_particles·spatial_dim must equal dim with n_particles ≥ 2, got "
                                 f"{n_particles}·{spatial_dim} for dim={dim}")
        self.n_particles, self.spatial_dim = n_particles, spatial_dim
        self.free_dim = (n_particles - 1) * spatial_dim if self.mean_free else self.dim
        basis = helmert_basis(n_particles) if self.mean_free else torch.zeros(0, 0, dtype=torch.float64)
        self.register_buffer("basis", basis, persistent=False)

    def to_free(self, x: Tensor) -> Tensor:
        if not self.mean_free:
            return x
        p = x.reshape(x.shape[0], self.n_particles, self.spatial_dim)
        return torch.einsum("kn,bnd->bkd", self.basis.to(x.dtype), p).reshape(x.shape[0], self.free_dim)

    def from_free(self, y: Tensor) -> Tensor:
        if not self.mean_free:
            return y
        q = y.reshape(y.shape[0], self.n_particles - 1, self.spatial_dim)
        return torch.einsum("kn,bkd->bnd", self.basis.to(y.dtype), q).reshape(y.shape[0], self.dim)

    def project(self, x: Tensor) -> Tensor:
        """Orthogonal projection onto the hyperplane (the identity for plain vectors)."""
        return self.from_free(self.to_free(x)) if self.mean_free else x


class GaussianPrior(_FreeCoordinates):
    """N(0, s²·I) on the free coordinates: the normalised λ = 0 end of the annealing paths.

    Args:
        dim: flat dimension D.
        scale: s > 0 (same units as the positions).
        n_particles, spatial_dim: both for a particle system (hyperplane density).
    """

    def __init__(self, dim: int, scale: float, n_particles: int | None = None, spatial_dim: int | None = None):
        super().__init__(dim, n_particles, spatial_dim)
        if not (math.isfinite(float(scale)) and float(scale) > 0):
            raise FlowforceError(f"scale must be a positive number, got {scale!r}")
        self.scale = float(scale)

    def log_prob(self, x: Tensor) -> Tensor:
        """Normalised log density ``(B,)`` of ``x (B, dim)`` (of its projection for particles)."""
        t = self.to_free(x) / self.scale
        return -0.5 * (t * t).sum(-1) - self.free_dim * (_HALF_LOG_2PI + math.log(self.scale))

    def energy(self, x: Tensor) -> Tensor:
        """−log_prob, ``(B,)``."""
        return -self.log_prob(x)

    def sample(self, n: int, dtype: torch.dtype = torch.float64) -> Tensor:
        """``(n, dim)`` samples (mean free for particles)."""
        return self.from_free(self.scale * torch.randn(int(n), self.free_dim, dtype=dtype))

    def noise(self, like: Tensor) -> Tensor:
        """Standard normal noise on the hyperplane, shaped like ``like (B, dim)``."""
        return self.from_free(torch.randn(like.shape[0], self.free_dim, dtype=like.dtype))

    def sq_norm(self, v: Tensor) -> Tensor:
        """|v|² of the in-plane part of ``v (B, dim)``, ``(B,)``."""
        f = self.to_free(v)
        return (f * f).sum(-1)


def _log_phi(t: Tensor) -> Tensor:
    return (-0.5 * t * t - _HALF_LOG_2PI).sum(-1)


class RealCoupling(_FreeCoordinates):
    """A bijection of ℝ^D (of the hyperplane for particles) with an analytic forward map.

    Args:
        dim, n_particles, spatial_dim: as :class:`GaussianPrior`.
        scale: s > 0, the width of the region the cube flow reshapes.
        transform, n_layers, hidden, n_components: of the :class:`CouplingFlow`
            (identity at initialisation).
    """

    def __init__(self, dim: int, scale: float, n_particles: int | None = None, spatial_dim: int | None = None,
                 transform: str = "spline", n_layers: int = 2, hidden: int | Sequence[int] = 32,
                 n_components: int = 8):
        super().__init__(dim, n_particles, spatial_dim)
        self.scale = float(scale)
        hidden = [hidden, hidden] if isinstance(hidden, int) else [int(h) for h in hidden]
        self.cube = CouplingFlow([False] * self.free_dim, transform=transform, n_layers=int(n_layers), hidden=hidden,
                                 n_components=int(n_components), identity_init=True)

    def _quantile(self, u: Tensor) -> Tensor:
        finfo = torch.finfo(u.dtype)
        return torch.special.ndtri(u.clamp(finfo.tiny, 1.0 - finfo.eps))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``y (B, dim)`` and ``ladj (B,) = log|det ∂y/∂x|`` on the free coordinates; analytic."""
        t = self.to_free(x) / self.scale
        z, ladj = self.cube.to_latent(torch.special.ndtr(t))
        t_out = self._quantile(z)
        return self.from_free(self.scale * t_out), ladj + _log_phi(t) - _log_phi(t_out)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``x (B, dim)`` and ``ladj (B,) = log|det ∂x/∂y|`` (root finding in the cube flow)."""
        t = self.to_free(y) / self.scale
        u, ladj = self.cube.to_data(torch.special.ndtr(t))
        t_in = self._quantile(u)
        return self.from_free(self.scale * t_in), ladj + _log_phi(t) - _log_phi(t_in)


class FlatParticleTarget:
    """A target over positions ``(B, N, 3)`` (an :class:`~openmm_flowforce.targets.openmm_energy.OpenMMEnergy`)
    seen as a sampler target over flat positions ``x (B, 3N)`` (nm): ``energy(x)`` is the
    reduced energy u = E/kT ``(B,)``, ``dim = 3N``, ``n_particles = N``, ``spatial_dim = 3``
    (so flows and priors are mean free). The registry name a target got from
    :func:`~openmm_flowforce.samplers.common.make_target` is kept, for checkpoints.
    """

    def __init__(self, target: Callable[[Tensor], Tensor], n_particles: int):
        self.target, self.n_particles, self.spatial_dim = target, int(n_particles), 3
        self.dim = 3 * self.n_particles
        for name in ("_flowforce_target_name", "_flowforce_target_kwargs"):
            if hasattr(target, name):
                setattr(self, name, getattr(target, name))

    def energy(self, x: Tensor) -> Tensor:
        return self.target(x.reshape(x.shape[0], self.n_particles, 3))


def as_sampler_target(target: Any) -> Any:
    """``target`` itself when it has ``dim`` and ``energy`` (the toys), else an OpenMM energy
    wrapped in :class:`FlatParticleTarget`.

    Raises:
        FlowforceError: a target that is neither.
    """
    if hasattr(target, "dim") and callable(getattr(target, "energy", None)):
        return target
    n = getattr(target, "n_particles", None)
    if callable(target) and isinstance(n, int):
        return FlatParticleTarget(target, n)
    raise FlowforceError(f"cannot sample {type(target).__name__}: a sampler target needs dim and energy(x), or "
                         "must be an OpenMM energy (get_target('openmm', system=..., temperature=...))")
