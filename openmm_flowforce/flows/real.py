"""A smooth normalizing flow on ℝ^D built from the unit-cube coupling flow.

Each coordinate of a cube-flow sample ``u ∈ [0, 1]^D`` is sent to the real line by the
scaled normal quantile function,

    y = s·Φ⁻¹(u)        (Φ the standard normal CDF, s = ``scale``),

so, with ``t = y/s`` and the uniform base of :class:`~openmm_flowforce.flows.CouplingFlow`,

    log q(y) = log q_cube(Φ(t)) + Σ_i log φ(t_i) − D·log s.

With the identity cube flow this is exactly N(0, s²·I); a trained cube flow reshapes that
Gaussian. The map inherits the smoothness of the cube flow (C∞ for ``"smooth"``), and
since ``Φ`` saturates far out, q has Gaussian tails: ``log q`` and its gradient stay
finite everywhere, which samplers that evaluate the flow at arbitrary points (AIS, HMC)
need.

Direction (see :mod:`openmm_flowforce.conventions`): ``to_latent(x)`` (data → latent
``z ∈ [0, 1]^D``) is analytic; ``to_data(z)`` uses the cube flow's root-finding inverse
with implicit gradients, so samples are differentiable in the parameters.

Particle systems (``n_particles`` and ``spatial_dim`` given). DW-4 and LJ-n energies are
invariant under translations, so exp(−u) is not normalisable over all N·d coordinates,
and reverse KL on the full coordinates would inflate the centre-of-mass spread without
bound. The flow therefore models the (N−1)·d coordinates of the zero-centre-of-mass
hyperplane, in the orthonormal Helmert basis ``H`` ((N−1) × N, rows orthonormal and
orthogonal to (1, …, 1)), applied per spatial axis:

    y = H·x (per axis),   x = Hᵀ·y.

Samples are mean free. Because ``H`` is an isometry of the hyperplane onto ℝ^{(N−1)d},
``log q(x)`` is the density with respect to the Lebesgue measure *on the hyperplane*
(no Jacobian term). ``log_prob`` of positions that are not mean free is the density of
their projection, i.e. the centre of mass is removed first; importance weights against
exp(−u) and log Z (:func:`~openmm_flowforce.analysis.metrics.log_partition`) then refer
to the target restricted to the hyperplane, ``Z = ∫_{Σx_i=0} exp(−u)``, the convention of
equivariant flows on these systems (Köhler, Klein, Noé 2020, arXiv 2006.02425).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .coupling import CouplingFlow
from ..errors import FlowforceError

Tensor = torch.Tensor

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def helmert_basis(n: int) -> Tensor:
    """Rows of the Helmert matrix without its first row: ``(n−1, n)`` float64.

    Row k (k = 1 … n−1) is ``(1, …, 1, −k, 0, …, 0)/sqrt(k(k+1))`` with k ones; the rows
    are orthonormal and orthogonal to the all-ones vector, so they are an orthonormal
    basis of the zero-sum subspace.
    """
    basis = torch.zeros(n - 1, n, dtype=torch.float64)
    for k in range(1, n):
        basis[k - 1, :k] = 1.0
        basis[k - 1, k] = -float(k)
        basis[k - 1] /= math.sqrt(k * (k + 1))
    return basis


def _log_normal_pdf(t: Tensor) -> Tensor:
    return -0.5 * t * t - _HALF_LOG_2PI


class RealFlow(nn.Module):
    """A normalizing flow on ℝ^D: ``x = scale·Φ⁻¹(u)``, ``u`` from a :class:`CouplingFlow`.

    Args:
        dim: data dimension D (``n_particles·spatial_dim`` for particle systems).
        scale: s > 0; the identity cube flow is N(0, s²·I).
        n_particles, spatial_dim: give both to model the zero-centre-of-mass hyperplane
            of a particle system (flat positions ``(x1, y1, x2, y2, …)``); the flow then
            has (N−1)·d dimensions (see the module docstring for what this does to the
            density).
        transform, n_layers, hidden, n_components, identity_init: passed to
            :class:`CouplingFlow` (all dimensions are intervals).

    Example:
        >>> flow = RealFlow(2, scale=3.0)
        >>> x, log_q = flow.sample_and_log_prob(5)     # (5, 2), (5,)
        >>> torch.allclose(flow.log_prob(x), log_q)
        True
    """

    def __init__(self, dim: int, scale: float = 1.0, n_particles: int | None = None,
                 spatial_dim: int | None = None, transform: str = "smooth", n_layers: int = 4,
                 hidden: int | Sequence[int] = (64, 64), n_components: int = 8, identity_init: bool = True):
        super().__init__()
        dim = int(dim)
        if dim < 1:
            raise FlowforceError(f"dim must be at least 1, got {dim}")
        if not (math.isfinite(float(scale)) and float(scale) > 0):
            raise FlowforceError(f"scale must be a positive number, got {scale!r}")
        if (n_particles is None) != (spatial_dim is None):
            raise FlowforceError("give both n_particles and spatial_dim (mean-free particle flow) or neither, got "
                                 f"n_particles={n_particles!r}, spatial_dim={spatial_dim!r}")
        mean_free = n_particles is not None
        if mean_free:
            n_particles, spatial_dim = int(n_particles), int(spatial_dim)
            if n_particles < 2 or spatial_dim < 1 or n_particles * spatial_dim != dim:
                raise FlowforceError(f"n_particles·spatial_dim must equal dim with n_particles ≥ 2, got "
                                     f"{n_particles}·{spatial_dim} for dim={dim}")
        hidden = [hidden, hidden] if isinstance(hidden, int) else [int(h) for h in hidden]
        self.config: dict[str, Any] = dict(dim=dim, scale=float(scale), n_particles=n_particles,
                                           spatial_dim=spatial_dim, transform=transform, n_layers=int(n_layers),
                                           hidden=hidden, n_components=int(n_components),
                                           identity_init=bool(identity_init))
        self.dim = dim
        self.scale = float(scale)
        self.mean_free = mean_free
        self.n_particles, self.spatial_dim = n_particles, spatial_dim
        self.free_dim = (n_particles - 1) * spatial_dim if mean_free else dim
        self.cube = CouplingFlow([False] * self.free_dim, transform=transform, n_layers=n_layers, hidden=hidden,
                                 n_components=n_components, identity_init=identity_init)
        basis = helmert_basis(n_particles) if mean_free else torch.zeros(0, 0, dtype=torch.float64)
        self.register_buffer("basis", basis.to(torch.get_default_dtype()), persistent=False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "RealFlow":
        """Rebuild a flow from its :attr:`config` (then load the state dict)."""
        return cls(**dict(config))

    # -- the hyperplane of zero centre of mass -----------------------------------------------
    def _to_free(self, x: Tensor) -> Tensor:
        if not self.mean_free:
            return x
        p = x.reshape(x.shape[0], self.n_particles, self.spatial_dim)
        return torch.einsum("kn,bnd->bkd", self.basis.to(x.dtype), p).reshape(x.shape[0], self.free_dim)

    def _from_free(self, y: Tensor) -> Tensor:
        if not self.mean_free:
            return y
        q = y.reshape(y.shape[0], self.n_particles - 1, self.spatial_dim)
        return torch.einsum("kn,bkd->bnd", self.basis.to(y.dtype), q).reshape(y.shape[0], self.dim)

    def project(self, x: Tensor) -> Tensor:
        """``x (B, dim)`` with the centre of mass removed (particle flows); ``x`` itself otherwise."""
        return self._from_free(self._to_free(x)) if self.mean_free else x

    def _check(self, x: Tensor, name: str, width: int) -> None:
        if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != width:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise FlowforceError(f"{name} must have shape (batch, {width}), got {shape}")

    # -- the two directions ------------------------------------------------------------------
    def to_latent(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Data → latent, analytic.

        Args:
            x: ``(B, dim)`` points of ℝ^D (centre of mass removed first for particle flows).

        Returns:
            ``z (B, free_dim)`` in the unit cube and ``ladj (B,) = log|det dz/dy|`` with
            ``y`` the free coordinates (``y = x`` unless mean free), so ``log q = ladj``.
        """
        self._check(x, "x", self.dim)
        t = self._to_free(x) / self.scale
        z, ladj = self.cube.to_latent(torch.special.ndtr(t))
        return z, ladj + _log_normal_pdf(t).sum(-1) - self.free_dim * math.log(self.scale)

    def to_data(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Latent → data (root finding in the cube flow).

        Args:
            z: ``(B, free_dim)`` points of the unit cube.

        Returns:
            ``x (B, dim)`` and ``ladj (B,) = log|det dy/dz|`` (``y`` the free coordinates).
            Cube values within one ulp of 0 or 1 are clamped before Φ⁻¹ (|t| ≤ ~8 in
            float64 on the upper side), so the map is invertible only inside that range.
        """
        self._check(z, "z", self.free_dim)
        u, ladj = self.cube.to_data(z)
        finfo = torch.finfo(u.dtype)
        t = torch.special.ndtri(u.clamp(finfo.tiny, 1.0 - finfo.eps))
        x = self._from_free(self.scale * t)
        return x, ladj - _log_normal_pdf(t).sum(-1) + self.free_dim * math.log(self.scale)

    # -- density model ----------------------------------------------------------------------
    def log_prob(self, x: Tensor) -> Tensor:
        """log q(x) ``(B,)`` for ``x (B, dim)``: the cube's uniform base has log density 0."""
        return self.to_latent(x)[1]

    def sample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        """n samples ``(n, dim)`` and their log q ``(n,)``; gradients reach the parameters."""
        ref = self.cube.layers[0].raw_offset
        z = torch.rand(n, self.free_dim, dtype=ref.dtype, device=ref.device)
        x, ladj = self.to_data(z)
        return x, -ladj

    def sample(self, n: int) -> Tensor:
        """n samples ``(n, dim)``."""
        return self.sample_and_log_prob(n)[0]
