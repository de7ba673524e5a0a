r"""Force matching in internal coordinates: every bond, angle and torsion weighs alike.

The Cartesian force-matching loss ``‖F_θ − F‖²`` is dominated by the stiff modes: the force
along a CG bond is one to two orders of magnitude larger, and (for forces taken from a flow
fitted to little data) far rougher, than the torque on a backbone torsion. A net that cannot
follow the bond roughness spends its capacity on it and the weak torsional signal that sets
the free-energy surface is not learned (BENCHMARKS "data efficiency", issue 15).

Here the forces are expressed as **generalised forces on the internal coordinates**
``q(x)`` (bonds, angles, torsions of the CG Z-matrix). With the Wilson matrix
``B = ∂q/∂x`` (``k × 3n``, ``k = 3n − 6``), a force of a potential invariant under rigid
motions is ``F = −∇ₓU = −Bᵀ ∂U/∂q = Bᵀ G``, so

    G = (B Bᵀ)⁻¹ B F           (kJ/mol per nm for bonds, per rad for angles and torsions)

recovers ``G = −∂U/∂q`` exactly (the 6 rigid-body directions carry no force). The loss

    L = Σ_k w_k · mean_t ((G_θ − G)_{tk} / s_k)²  /  Σ_k w_k,

with ``s_k`` the RMS of the training ``G_k``, gives each coordinate the same say (times its
kind's weight ``w``: ``bond``, ``angle``, ``torsion``). It is zero exactly when the Cartesian
loss is (``P = (BBᵀ)⁻¹B`` is injective on invariant forces), so it has the same minimiser
for a net that can represent the target; for a net that cannot, it trades bond errors for
torsion accuracy. A zero force field scores 1, as in the Cartesian loss.

Internal coordinates as in Köhler, Chen, Krämer, Clementi, Noé (JCTC 2023, arXiv:2203.11167),
whose flows work in them; projecting force-matching targets onto soft coordinates is one of
the variants measured for issue 15.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from ..coordinates.internal import InternalCoordinates
from ..errors import FlowforceError

Tensor = torch.Tensor

__all__ = ["COORDINATE_KINDS", "InternalForceLoss", "internal_coordinates", "projection_matrices"]

#: The kinds of internal coordinate, in Z-matrix order (bonds, then angles, then torsions).
COORDINATE_KINDS = ("bond", "angle", "torsion")


def internal_coordinates(topology: Any) -> InternalCoordinates:
    """The Z-matrix internal coordinates of a (CG) molecule from its bonds."""
    return InternalCoordinates.from_topology(topology)


def _q(ic: InternalCoordinates, x: Tensor) -> Tensor:
    bonds, angles, torsions = ic.to_internal(x, check=False)
    return torch.cat([bonds, angles, torsions], dim=-1)


def projection_matrices(ic: InternalCoordinates, positions: Tensor, chunk: int = 2048) -> Tensor:
    """``P = (B Bᵀ)⁻¹ B`` per frame, mapping Cartesian forces to generalised forces.

    Args:
        ic: internal coordinates of the molecule (``n`` atoms or beads).
        positions: ``(T, n, 3)`` nm, float64 recommended.
        chunk: frames per batched Jacobian.

    Returns:
        ``(T, 3n − 6, 3n)`` in the positions' dtype.

    Raises:
        FlowforceError: a frame where ``B Bᵀ`` is singular (a linear angle: its torsions are
            undefined).
    """
    x = positions.detach()
    n = ic.n_atoms
    out = []
    for start in range(0, len(x), chunk):
        xs = x[start:start + chunk]
        # Frames are independent, so the gradient of Σ_t q_tk is row k of every frame's B.
        xs = xs.clone().requires_grad_(True)
        with torch.enable_grad():
            q = _q(ic, xs)
            rows = [torch.autograd.grad(q[:, k].sum(), xs, retain_graph=k + 1 < ic.dim)[0] for k in range(ic.dim)]
        b = torch.stack(rows, dim=1).reshape(len(xs), ic.dim, 3 * n)
        gram = b @ b.transpose(1, 2)
        solved = torch.linalg.solve_ex(gram, b)
        if bool((solved.info != 0).any()) or not bool(torch.isfinite(solved.result).all()):
            bad = start + int(torch.nonzero((solved.info != 0) | ~torch.isfinite(solved.result).flatten(1).all(1))[0])
            raise FlowforceError(f"frame {bad} has a (near-)linear angle, where torsion forces are undefined; "
                                 "drop such frames or use the Cartesian force-matching loss (cg_loss.kind cartesian)")
        out.append(solved.result)
    return torch.cat(out)


class InternalForceLoss:
    """The internal-coordinate force-matching loss (module docstring).

    Args:
        ic: internal coordinates of the CG molecule (``n`` beads, ``k = 3n − 6``).
        weights: weight per kind (:data:`COORDINATE_KINDS`), default 1 each.

    Attributes:
        weights: ``(k,)`` per-coordinate weights, normalised to sum 1.
        scales: ``(k,)`` RMS generalised training force per coordinate (:meth:`fit_scales`).
    """

    def __init__(self, ic: InternalCoordinates, weights: Mapping[str, float] | None = None):
        unknown = set(weights or {}) - set(COORDINATE_KINDS)
        if unknown:
            raise FlowforceError(f"unknown internal-coordinate kind(s) {sorted(unknown)} in the loss weights; "
                                 f"valid: {', '.join(COORDINATE_KINDS)}")
        n = ic.n_atoms
        counts = {"bond": n - 1, "angle": n - 2, "torsion": n - 3}
        per_kind = {kind: float((weights or {}).get(kind, 1.0)) for kind in COORDINATE_KINDS}
        if any(not np.isfinite(w) or w < 0 for w in per_kind.values()) or sum(per_kind.values()) <= 0:
            raise FlowforceError(f"internal-coordinate loss weights must be ≥ 0 and not all 0, got {per_kind}")
        w = torch.cat([torch.full((counts[k],), per_kind[k], dtype=torch.float64) for k in COORDINATE_KINDS])
        self.ic = ic
        self.weights = w / w.sum()
        self.scales = torch.ones_like(w)

    def projections(self, positions: Tensor) -> Tensor:
        """:func:`projection_matrices` of ``positions`` ``(T, n, 3)``: ``(T, k, 3n)``."""
        return projection_matrices(self.ic, positions)

    def fit_scales(self, projections: Tensor, forces: Tensor) -> None:
        """Set ``s_k`` to the RMS of the training generalised forces ``P F``."""
        g = self.generalised(projections, forces)
        self.scales = g.pow(2).mean(0).sqrt().clamp_min(torch.finfo(g.dtype).tiny)

    @staticmethod
    def generalised(projections: Tensor, forces: Tensor) -> Tensor:
        """``G = P F``: ``(T, k)`` from ``P`` ``(T, k, 3n)`` and ``F`` ``(T, n, 3)``."""
        return (projections @ forces.reshape(len(forces), -1, 1)).squeeze(-1)

    def per_frame(self, projections: Tensor, predicted: Tensor, forces: Tensor) -> Tensor:
        """The loss of each frame ``(B,)``: predicted forces ``(B, n, 3)`` against ``forces`` at
        frames whose :meth:`projections` are ``projections`` ``(B, k, 3n)``."""
        delta = self.generalised(projections, predicted - forces) / self.scales.to(predicted)
        return (delta.pow(2) * self.weights.to(predicted)).sum(-1)

    def __call__(self, projections: Tensor, predicted: Tensor, forces: Tensor) -> Tensor:
        """The loss: the mean of :meth:`per_frame`."""
        return self.per_frame(projections, predicted, forces).mean()
