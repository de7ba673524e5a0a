"""An SE(3)-equivariant augmented coupling flow for particle systems (d = 2 or 3).

Midgley, Stimper, Antorán, Mathieu, Schölkopf, Hernández-Lobato, "SE(3) Equivariant
Augmented Coupling Flows", NeurIPS 2023, arXiv 2308.10364 (the "projected" variant of
Sec. 3.2), written from the paper.

**Augmented space.** Each of the N particles ``x_i ∈ ℝ^d`` gets one auxiliary copy
``a_i ∈ ℝ^d``. The flow models the joint q(x, a); the target is extended to
``p(x)·π(a|x)`` with ``π(a|x) = N(a; x, σ_a²·I)``, which has the same x-marginal.

**Translations.** Densities of DW-4 and LJ-n are translation invariant, so the flow lives
on (x, a) modulo a common translation, a space of dimension (2N − 1)·d. Its points are
represented with zero centre of mass of x (``x̄ = 0``, a free), and every density here is
with respect to ``dx_V·da``: Lebesgue measure on the zero-CoM hyperplane of x (the
convention of :class:`~openmm_flowforce.flows.RealFlow`, via the Helmert isometry) times
Lebesgue measure on ℝ^{N·d} for a. Marginalising a thus gives ``log q(x)`` in exactly
RealFlow's convention.

**Base.** ``x ~ N(0, s²·I)`` on the zero-CoM hyperplane ((N − 1)·d dimensions), ``a | x ~
π(a|x)``.

**Coupling blocks** alternate between transforming a given x and x given a. A block
transforming the set P given the set C (positions ``(N, d)`` each) runs an
:class:`~openmm_flowforce.nn.egnn.EGNNVectors` on C, which returns per particle d
equivariant vectors ``v⁰…v^{d−1}`` and invariant features ``h_i``, and builds a local
frame: origin ``o_i = c_i + v⁰_i`` and orthonormal basis ``U_i`` (rows) by Gram–Schmidt
of ``v¹_i … v^{d−1}_i``, completed to a right-handed basis (90° rotation in 2-D, cross
product in 3-D). Then

    p_i' = o_i + U_iᵀ f_{θ(h_i)}(U_i (p_i − o_i)),

f elementwise monotone on ℝ (``"affine"`` or the C∞ ``"smooth"``, see
:mod:`openmm_flowforce.bijections.line`), its parameters a linear function of ``h_i``
initialised to the identity. Since U_i is orthonormal, ``log|det ∂p'/∂p| = Σ log f'``.
Rotations R ∈ SO(d), translations and permutations of (x, a) carry through the vectors,
hence the frames, hence the map: the flow is SE(d)- and permutation equivariant by
construction, and its density invariant under them.

Why SE(d) (as the paper's title says) and not E(d): a frame that is also reflection
equivariant needs d independent equivariant vectors, but every equivariant vector of a
planar configuration lies in its plane (three particles in 3-D always are), so
Gram–Schmidt of d vectors breaks down there; the handed completion needs only d − 1. The
targets are reflection invariant too, so the mirror image of a mode is one more mode the
flow has to learn rather than one it gets for free.

A block that moves a leaves x̄ = 0 as it is. A block that moves x first changes the
representative to ``ā = 0`` (subtract ā from x and a), transforms x, then returns to
x̄ = 0 (subtract the new x̄ from both); both shifts have unit Jacobian in the (x_V, a_V,
mean) coordinates, so the block's ``ladj`` is still ``Σ log f'``, and its inverse
recovers the shifts from ``ā`` (see :meth:`EquivariantCoupling.inverse`).

**Marginal density of x** (used for NLL and ESS) by importance sampling over a with the
proposal π(a|x) and K = ``n_importance`` draws:

    log q(x) ≈ log (1/K) Σ_k q(x, a_k)/π(a_k|x),   a_k ~ π(a|x),

i.e. ``logsumexp_k[log q(x, a_k) − log π(a_k|x)] − log K``: unbiased for q(x), a lower
bound of log q(x) in expectation (Jensen), so NLLs reported with it are slightly pessimistic.

Training (FAB, reverse KL) uses the joint: :meth:`EquivariantAugmentedFlow.training_view`
is a density model on flat ``[x, a]`` vectors of length 2·N·d and
:meth:`~EquivariantAugmentedFlow.joint_energy` the reduced energy of the extended target,
``u(x) − log π(a|x)``, as the paper does.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..bijections.line import get_line_family
from ..nn.egnn import EGNNVectors
from ..errors import FlowforceError

Tensor = torch.Tensor

_LOG_2PI = math.log(2.0 * math.pi)


def orthonormal_frame(vectors: Tensor) -> Tensor:
    """A right-handed orthonormal basis (rows) from ``vectors (..., d − 1, d)``, d ∈ {2, 3}.

    Gram–Schmidt of the d − 1 given vectors, completed by the 90° rotation of the first
    (d = 2) or the cross product of the two (d = 3). Rotation equivariant:
    ``frame(v R) = frame(v) R`` for R ∈ SO(d) (for a reflection the last row changes
    sign, so the frame is SO(d)-, not O(d)-equivariant; see the module docstring). Exactly
    orthonormal unless the vectors are (numerically) dependent.
    """
    rows: list[Tensor] = []
    for k in range(vectors.shape[-2]):
        u = vectors[..., k, :]
        for e in rows:
            u = u - (u * e).sum(-1, keepdim=True) * e
        rows.append(u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    if vectors.shape[-1] == 2:
        rows.append(torch.stack([-rows[0][..., 1], rows[0][..., 0]], dim=-1))
    else:
        rows.append(torch.linalg.cross(rows[0], rows[1], dim=-1))
    return torch.stack(rows, dim=-2)


class EquivariantCoupling(nn.Module):
    """One coupling block of the projected equivariant augmented flow.

    Args:
        n_particles, spatial_dim: N, d.
        transformed: ``"x"`` (transform x given a) or ``"a"`` (a given x).
        transform: real-line family name (``"affine"``, ``"smooth"``).
        n_components: mixture components of the ``"smooth"`` family.
        hidden: EGNN width.
        egnn_layers: EGNN message-passing layers.
    """

    def __init__(self, n_particles: int, spatial_dim: int, transformed: str, transform: str = "smooth",
                 n_components: int = 8, hidden: int = 32, egnn_layers: int = 2):
        super().__init__()
        if transformed not in ("x", "a"):
            raise FlowforceError(f"transformed must be 'x' or 'a', got {transformed!r}")
        self.transformed = transformed
        self.family = get_line_family(transform)
        self.n_particles, self.spatial_dim = n_particles, spatial_dim
        self.n_params = self.family.n_params(n_components)
        self.net = EGNNVectors(n_particles, spatial_dim, spatial_dim, hidden=hidden, n_layers=egnn_layers)
        self.params = nn.Linear(hidden, spatial_dim * self.n_params)
        # Identity start: the transform's parameters do not depend on h until trained.
        nn.init.zeros_(self.params.weight)
        with torch.no_grad():
            self.params.bias.copy_(self.family.identity_raw(n_components).repeat(spatial_dim))

    def _map(self, p: Tensor, cond: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """Transform positions p ``(B, N, d)`` in the local frames built from cond ``(B, N, d)``."""
        vectors, h = self.net(cond)
        origin = cond + vectors[:, :, 0]
        basis = orthonormal_frame(vectors[:, :, 1:])                               # (B, N, d, d), rows
        raw = self.params(h).reshape(*p.shape, self.n_params)
        bijection = self.family.build(raw)
        local = torch.einsum("bnkd,bnd->bnk", basis, p - origin)
        local, ladj = bijection.inverse(local) if inverse else bijection.forward(local)
        return origin + torch.einsum("bnkd,bnk->bnd", basis, local), ladj

    def forward(self, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(x, a)`` with x̄ = 0, each ``(B, N, d)`` → ``(x', a', ladj (B,))`` with x̄' = 0."""
        if self.transformed == "a":
            a, ladj = self._map(a, x, inverse=False)
            return x, a, ladj
        shift = a.mean(dim=1, keepdim=True)                  # to the representative with ā = 0
        x, a = x - shift, a - shift
        x, ladj = self._map(x, a, inverse=False)
        centre = x.mean(dim=1, keepdim=True)                 # back to x̄ = 0
        return x - centre, a - centre, ladj

    def inverse(self, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Inverse of :meth:`forward`; ``ladj`` of the inverse map."""
        if self.transformed == "a":
            a, ladj = self._map(a, x, inverse=True)
            return x, a, ladj
        # forward left a' = a_c − m with ā_c = 0, so m = −ā'.
        m = -a.mean(dim=1, keepdim=True)
        x, a = x + m, a + m
        x, ladj = self._map(x, a, inverse=True)
        centre = x.mean(dim=1, keepdim=True)
        return x - centre, a - centre, ladj


class EquivariantAugmentedFlow(nn.Module):
    """SE(d)-equivariant augmented coupling flow for N identical particles in d ∈ {2, 3} dimensions.

    Args:
        n_particles, spatial_dim: N ≥ d, d ∈ {2, 3}.
        n_layers: coupling blocks, alternating a-given-x and x-given-a (a first).
        hidden: EGNN width.
        egnn_layers: message-passing layers of each block's EGNN.
        transform: real-line family (``"affine"``, ``"smooth"``).
        n_components: mixture components (``"smooth"``).
        scale: std s of the base Gaussian of x.
        aug_scale: std σ_a of π(a|x) (base and extended target); None: s/2.
        n_importance: K, draws of a per x in :meth:`log_prob`.

    ``x`` is flat ``(B, N·d)`` everywhere in the public API (as the targets use it); joint
    points are flat ``(B, 2·N·d)`` = ``[x, a]``.
    """

    def __init__(self, n_particles: int, spatial_dim: int, n_layers: int = 8, hidden: int = 32,
                 egnn_layers: int = 2, transform: str = "smooth", n_components: int = 8, scale: float = 1.0,
                 aug_scale: float | None = None, n_importance: int = 20):
        super().__init__()
        n_particles, spatial_dim, n_layers = int(n_particles), int(spatial_dim), int(n_layers)
        if spatial_dim not in (2, 3) or n_particles < max(spatial_dim, 2):
            raise FlowforceError(f"the equivariant flow needs spatial_dim 2 or 3 and at least that many particles "
                                 f"(≥ 2) to build local frames, got n_particles={n_particles}, "
                                 f"spatial_dim={spatial_dim}")
        for name, value in (("n_layers", n_layers), ("n_importance", n_importance), ("hidden", hidden),
                            ("egnn_layers", egnn_layers)):
            if isinstance(value, bool) or int(value) != value or int(value) < 1:
                raise FlowforceError(f"{name} must be a positive integer, got {value!r}")
        aug_scale = 0.5 * float(scale) if aug_scale is None else float(aug_scale)
        for name, value in (("scale", scale), ("aug_scale", aug_scale)):
            if not (math.isfinite(float(value)) and float(value) > 0):
                raise FlowforceError(f"{name} must be a positive number, got {value!r}")
        self.config: dict[str, Any] = dict(n_particles=n_particles, spatial_dim=spatial_dim, n_layers=n_layers,
                                           hidden=int(hidden), egnn_layers=int(egnn_layers), transform=transform,
                                           n_components=int(n_components), scale=float(scale),
                                           aug_scale=aug_scale, n_importance=int(n_importance))
        self.n_particles, self.spatial_dim = n_particles, spatial_dim
        self.dim = n_particles * spatial_dim
        self.scale, self.aug_scale, self.n_importance = float(scale), aug_scale, int(n_importance)
        self.layers = nn.ModuleList(
            EquivariantCoupling(n_particles, spatial_dim, "a" if i % 2 == 0 else "x", transform, int(n_components),
                                int(hidden), int(egnn_layers)) for i in range(n_layers))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "EquivariantAugmentedFlow":
        return cls(**dict(config))

    # -- shapes and the zero-CoM representative --------------------------------------------
    def _positions(self, flat: Tensor, width: int, name: str) -> Tensor:
        if not isinstance(flat, Tensor) or flat.ndim != 2 or flat.shape[1] != width:
            shape = tuple(flat.shape) if isinstance(flat, Tensor) else type(flat).__name__
            raise FlowforceError(f"{name} must have shape (batch, {width}), got {shape}")
        return flat.reshape(flat.shape[0], -1, self.n_particles, self.spatial_dim)

    def split(self, joint: Tensor) -> tuple[Tensor, Tensor]:
        """Flat ``(B, 2·N·d)`` → x, a ``(B, N, d)`` each, shifted so that x̄ = 0."""
        both = self._positions(joint, 2 * self.dim, "joint points")
        x, a = both[:, 0], both[:, 1]
        centre = x.mean(dim=1, keepdim=True)
        return x - centre, a - centre

    @staticmethod
    def join(x: Tensor, a: Tensor) -> Tensor:
        return torch.cat([x.reshape(x.shape[0], -1), a.reshape(a.shape[0], -1)], dim=1)

    def project(self, x: Tensor) -> Tensor:
        """``x (B, N·d)`` with its centre of mass removed."""
        p = self._positions(x, self.dim, "x")[:, 0]
        return (p - p.mean(dim=1, keepdim=True)).reshape(x.shape[0], self.dim)

    # -- densities of the base and of the auxiliary variables ------------------------------
    def log_aux(self, x: Tensor, a: Tensor) -> Tensor:
        """log π(a|x) ``(B,)`` = Σ log N(a_i; x_i, σ_a²·I) for x, a ``(B, N, d)``."""
        s = self.aug_scale
        return (-0.5 * ((a - x) / s).pow(2).sum((1, 2))
                - 0.5 * self.dim * (_LOG_2PI + 2.0 * math.log(s)))

    def base_log_prob(self, x: Tensor, a: Tensor) -> Tensor:
        """log of the base density ``(B,)`` (x on its zero-CoM hyperplane, x̄ = 0 assumed)."""
        free = (self.n_particles - 1) * self.spatial_dim
        log_x = -0.5 * (x / self.scale).pow(2).sum((1, 2)) - 0.5 * free * (_LOG_2PI + 2.0 * math.log(self.scale))
        return log_x + self.log_aux(x, a)

    # -- the two directions ---------------------------------------------------------------
    def to_latent(self, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Data → latent: x, a ``(B, N, d)`` (x̄ = 0) → z_x, z_a and ``ladj (B,)``."""
        ladj = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, a, l = layer(x, a)
            ladj = ladj + l
        return x, a, ladj

    def to_data(self, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Latent → data (root finding for ``"smooth"``); ``ladj = log|det ∂data/∂latent|``."""
        ladj = x.new_zeros(x.shape[0])
        for layer in reversed(self.layers):
            x, a, l = layer.inverse(x, a)
            ladj = ladj + l
        return x, a, ladj

    def joint_log_prob(self, joint: Tensor) -> Tensor:
        """log q(x, a) ``(B,)`` of flat joint points ``(B, 2·N·d)`` (translated to x̄ = 0 first)."""
        zx, za, ladj = self.to_latent(*self.split(joint))
        return self.base_log_prob(zx, za) + ladj

    def joint_sample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        """n joint samples ``(n, 2·N·d)`` (x̄ = 0) and log q(x, a); differentiable in the parameters."""
        ref = self.layers[0].params.bias
        zx = self.scale * torch.randn(n, self.n_particles, self.spatial_dim, dtype=ref.dtype, device=ref.device)
        zx = zx - zx.mean(dim=1, keepdim=True)
        za = zx + self.aug_scale * torch.randn_like(zx)
        log_base = self.base_log_prob(zx, za)
        x, a, ladj = self.to_data(zx, za)
        return self.join(x, a), log_base - ladj

    # -- the x-marginal ----------------------------------------------------------------------
    def log_prob(self, x: Tensor, n_importance: int | None = None, chunk: int = 256) -> Tensor:
        """log q(x) ``(B,)`` for ``x (B, N·d)`` by importance sampling over a (module docstring).

        Uses ``n_importance`` (default: the flow's K) draws of a ~ π(a|x) per x, evaluated
        in chunks of ``chunk`` configurations to bound memory.
        """
        p = self._positions(x, self.dim, "x")[:, 0]
        p = p - p.mean(dim=1, keepdim=True)
        k = int(n_importance or self.n_importance)
        out = []
        for part in p.split(chunk):
            terms = []
            for _ in range(k):
                a = part + self.aug_scale * torch.randn_like(part)
                zx, za, ladj = self.to_latent(part, a)
                terms.append(self.base_log_prob(zx, za) + ladj - self.log_aux(part, a))
            out.append(torch.logsumexp(torch.stack(terms), dim=0) - math.log(k))
        return torch.cat(out)

    def sample(self, n: int) -> Tensor:
        """n samples of x ``(n, N·d)``, zero centre of mass."""
        return self.joint_sample_and_log_prob(n)[0][:, :self.dim]

    def sample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        """n samples of x and their importance-sampled log q(x)."""
        x = self.sample(n)
        return x, self.log_prob(x)

    # -- training on the extended target -----------------------------------------------------
    def training_view(self) -> "JointView":
        """The density model on joint points that FAB and reverse KL train (shares parameters)."""
        return JointView(self)

    def joint_energy(self, energy: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        """Reduced energy of the extended target: ``(B, 2·N·d) -> u(x) − log π(a|x)``."""

        def joint(joint_points: Tensor) -> Tensor:
            x, a = self.split(joint_points)
            return energy(x.reshape(x.shape[0], self.dim)) - self.log_aux(x, a)

        return joint


class JointView(nn.Module):
    """The joint density q(x, a) of an :class:`EquivariantAugmentedFlow` with the
    ``RealFlow`` sampler interface (``dim``, ``log_prob``, ``sample``,
    ``sample_and_log_prob``, ``project``) on flat ``[x, a]`` points."""

    def __init__(self, flow: EquivariantAugmentedFlow):
        super().__init__()
        self.flow = flow
        self.dim = 2 * flow.dim

    def log_prob(self, joint: Tensor) -> Tensor:
        return self.flow.joint_log_prob(joint)

    def sample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        return self.flow.joint_sample_and_log_prob(n)

    def sample(self, n: int) -> Tensor:
        return self.flow.joint_sample_and_log_prob(n)[0]

    def project(self, joint: Tensor) -> Tensor:
        return self.flow.join(*self.flow.split(joint))
