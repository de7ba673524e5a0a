"""Monotone rational-quadratic splines on [0, 1] and on the circle.

The transform is the rational-quadratic (RQ) spline of Durkan, Bekasov, Murray and
Papamakarios, "Neural Spline Flows", NeurIPS 2019, arXiv:1906.04032 (Sec. 3 and
App. A). It maps [0, 1] onto itself through ``K`` bins; in bin ``k`` with input knots
``x_k < x_{k+1}``, output knots ``y_k < y_{k+1}``, bin width ``w_k``, bin height ``h_k``,
slope ``s_k = h_k / w_k`` and knot derivatives ``d_k, d_{k+1} > 0``, with
``ξ = (x − x_k) / w_k`` ∈ [0, 1]:

    y = y_k + h_k [s_k ξ² + d_k ξ(1 − ξ)] / [s_k + (d_{k+1} + d_k − 2 s_k) ξ(1 − ξ)]

    dy/dx = s_k² [d_{k+1} ξ² + 2 s_k ξ(1 − ξ) + d_k (1 − ξ)²]
            / [s_k + (d_{k+1} + d_k − 2 s_k) ξ(1 − ξ)]²

The inverse solves a quadratic in ξ in closed form.

A circle transform is :class:`~openmm_flowforce.bijections.base.CircularShift` followed
by an interval spline whose derivatives at 0 and at 1 are one shared value; since the
spline fixes 0 and 1, the map is then a C¹ diffeomorphism of the circle [0, 1).

:class:`SplineFamily` (registry name ``"spline"``) turns unconstrained conditioner
outputs into these transforms and is registered on import.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from openmm_flowforce.bijections.base import (
    Bijection,
    CircularShift,
    Compose,
    ElementwiseFamily,
    register_family,
)

from ..errors import FlowforceError

Tensor = torch.Tensor

#: Smallest bin width/height as a fraction of [0, 1]; keeps slopes and the inverse bounded.
MIN_BIN = 1e-3
#: Smallest knot derivative; keeps log dy/dx finite.
MIN_DERIVATIVE = 1e-3


def _knots(sizes: Tensor) -> Tensor:
    """Knot positions ``(..., K+1)`` from bin sizes ``(..., K)`` summing to 1.

    The end knots are set to exactly 0 and 1 (instead of trusting the rounded cumulative
    sum), so that 0 ↦ 0 and 1 ↦ 1 exactly and outputs never leave [0, 1].
    """
    inner = torch.cumsum(sizes, dim=-1)[..., :-1]
    zero = torch.zeros_like(sizes[..., :1])
    return torch.cat([zero, inner, zero + 1.0], dim=-1)


def _find_bin(knots: Tensor, value: Tensor) -> Tensor:
    """Index ``(..., 1)`` of the bin of each value in ``(...)``; ``knots`` is ``(..., K+1)``.

    Searching only the interior knots means 0 lands in bin 0 and 1 in bin K−1; the clamp
    keeps values that rounding pushed marginally outside [0, 1] in the edge bins.
    """
    n_bins = knots.shape[-1] - 1
    idx = torch.searchsorted(knots[..., 1:-1].contiguous(), value.unsqueeze(-1).contiguous(), right=True)
    return idx.clamp(0, n_bins - 1)


def _take(params: Tensor, idx: Tensor) -> Tensor:
    """``params[..., idx]`` for a per-element index ``idx (..., 1)``; returns ``(...)``."""
    return torch.gather(params, -1, idx).squeeze(-1)


class RationalQuadraticSpline(Bijection):
    """Elementwise monotone rational-quadratic spline of [0, 1] onto itself.

    Durkan et al., "Neural Spline Flows", arXiv:1906.04032. Parameters are already
    constrained; :class:`SplineFamily` builds them from unconstrained conditioner output.

    Args:
        widths: ``(B, D, K)`` positive bin widths summing to 1 over the last axis.
        heights: ``(B, D, K)`` positive bin heights summing to 1 over the last axis.
        derivatives: ``(B, D, K+1)`` positive derivatives at the knots, both ends included.

    The leading ``(B, D)`` of the parameters may be anything that broadcasts to the shape
    of the input (e.g. ``(1, D)`` to share one spline across a batch).

    Raises:
        ValueError: if the parameter shapes do not fit together.
    """

    def __init__(self, widths: Tensor, heights: Tensor, derivatives: Tensor):
        if widths.shape != heights.shape:
            raise FlowforceError(
                f"widths and heights must have the same shape, got {tuple(widths.shape)} "
                f"and {tuple(heights.shape)}"
            )
        if derivatives.shape[:-1] != widths.shape[:-1] or derivatives.shape[-1] != widths.shape[-1] + 1:
            raise FlowforceError(
                f"derivatives must have shape (..., K+1) = {tuple(widths.shape[:-1]) + (widths.shape[-1] + 1,)}, "
                f"got {tuple(derivatives.shape)}"
            )
        self.widths = widths
        self.heights = heights
        self.derivatives = derivatives

    def _params(self, shape: torch.Size) -> tuple[Tensor, Tensor, Tensor]:
        """Parameters expanded to the input ``shape`` (searchsorted needs equal leading dims)."""
        k = self.widths.shape[-1]
        return (
            self.widths.expand(*shape, k),
            self.heights.expand(*shape, k),
            self.derivatives.expand(*shape, k + 1),
        )

    def _bin_of(self, value: Tensor, in_outputs: bool) -> tuple[Tensor, ...]:
        """Per-element bin of ``value (B, D)`` among the input or output knots.

        Returns ``(x_k, w, y_k, h, d_k, d_{k+1})``, each ``(B, D)``. Widths and heights are
        differences of the knots (not the given sizes) so that bins tile [0, 1] exactly.
        """
        widths, heights, derivs = self._params(value.shape)
        x_knots = _knots(widths)
        y_knots = _knots(heights)
        idx = _find_bin(y_knots if in_outputs else x_knots, value)
        x_k = _take(x_knots, idx)
        y_k = _take(y_knots, idx)
        return (
            x_k,
            _take(x_knots, idx + 1) - x_k,
            y_k,
            _take(y_knots, idx + 1) - y_k,
            _take(derivs, idx),
            _take(derivs, idx + 1),
        )

    @staticmethod
    def _log_slope(xi: Tensor, s: Tensor, d0: Tensor, d1: Tensor) -> Tensor:
        """``log dy/dx`` inside a bin at relative position ``xi``."""
        one_m = 1.0 - xi
        # s + (d0 + d1 − 2s)ξ(1−ξ) rewritten as a sum of non-negative terms: no cancellation.
        den = s * (xi * xi + one_m * one_m) + (d0 + d1) * xi * one_m
        num = d1 * xi * xi + 2.0 * s * xi * one_m + d0 * one_m * one_m
        return 2.0 * torch.log(s) + torch.log(num) - 2.0 * torch.log(den)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Apply the spline.

        Args:
            x: ``(B, D)`` inputs in [0, 1].

        Returns:
            ``y (B, D)`` in [0, 1] and ``ladj [B] = Σ_D log dy/dx``.
        """
        x_k, w, y_k, h, d0, d1 = self._bin_of(x, in_outputs=False)
        s = h / w

        # Clamping ξ only matters for inputs rounded just outside [0, 1]; clamp's gradient
        # is 1 on the closed interval, so exact 0 and 1 keep their derivatives.
        xi = ((x - x_k) / w).clamp(0.0, 1.0)
        one_m = 1.0 - xi
        den = s * (xi * xi + one_m * one_m) + (d0 + d1) * xi * one_m
        y = y_k + h * (s * xi * xi + d0 * xi * one_m) / den
        # Rounding in y_k + h·r can overshoot 1 by an ulp; downstream domains need [0, 1].
        y = y.clamp(0.0, 1.0)
        ladj = self._log_slope(xi, s, d0, d1).sum(dim=-1)
        return y, ladj

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Invert the spline analytically.

        In the bin of ``y``, ξ is the root in [0, 1] of ``a ξ² + b ξ + c = 0`` with
        ``a = h(s − d_k) + Δ(d_k + d_{k+1} − 2s)``, ``b = h d_k − Δ(d_k + d_{k+1} − 2s)``,
        ``c = −s Δ`` and ``Δ = y − y_k`` (arXiv:1906.04032, App. A). It is taken as
        ``ξ = 2c / (−b − √(b² − 4ac))``, which avoids cancellation: ``a + b = h s > 0``
        makes ``b > 0`` whenever ``ac > 0``, so the denominator never nears 0.

        Args:
            y: ``(B, D)`` inputs in [0, 1].

        Returns:
            ``x (B, D)`` in [0, 1] and ``ladj [B] = Σ_D log dx/dy``.
        """
        x_k, w, y_k, h, d0, d1 = self._bin_of(y, in_outputs=True)
        s = h / w

        delta = y - y_k
        curvature = d0 + d1 - 2.0 * s
        a = h * (s - d0) + delta * curvature
        b = h * d0 - delta * curvature
        c = -s * delta
        # The discriminant is ≥ 0 in exact arithmetic; the clamp only absorbs rounding.
        disc = (b * b - 4.0 * a * c).clamp_min(0.0)
        xi = (2.0 * c / (-b - torch.sqrt(disc))).clamp(0.0, 1.0)
        x = (x_k + xi * w).clamp(0.0, 1.0)
        ladj = -self._log_slope(xi, s, d0, d1).sum(dim=-1)
        return x, ladj


class SplineFamily(ElementwiseFamily):
    """Rational-quadratic splines built from unconstrained parameters (arXiv:1906.04032).

    Layout of the last axis of ``raw`` (``P = 3K + 1`` in both cases):

    * interval: ``K`` width logits, ``K`` height logits, ``K + 1`` raw knot derivatives;
    * periodic: ``K`` width logits, ``K`` height logits, ``K`` raw knot derivatives (the
      derivative at 0 is reused at 1) and 1 raw shift.

    Constraints: ``widths = MIN_BIN + (1 − K·MIN_BIN)·softmax(logits)`` (same for heights);
    ``derivatives = MIN_DERIVATIVE + softplus(raw + c)`` with ``c`` chosen so raw 0 gives
    derivative exactly 1; ``shift = raw_shift mod 1`` so raw 0 gives no shift. All-zero
    raw parameters are therefore the identity.
    """

    name = "spline"

    #: softplus(_DERIVATIVE_OFFSET) = 1 − MIN_DERIVATIVE, so raw 0 ↦ derivative 1.
    _DERIVATIVE_OFFSET = math.log(math.expm1(1.0 - MIN_DERIVATIVE))

    def n_params(self, n_components: int, periodic: bool) -> int:
        """Number of raw parameters per dimension for ``K = n_components`` bins: ``3K + 1``."""
        self._check_bins(n_components)
        return 3 * n_components + 1

    def build(self, raw: Tensor, periodic: bool) -> Bijection:
        """Build the spline from raw parameters.

        Args:
            raw: ``(B, D, 3K + 1)`` unconstrained parameters (leading dims may broadcast
                against the input later, e.g. ``(1, D, 3K + 1)``).
            periodic: build the circle transform (shift then spline with equal end
                derivatives) instead of the interval one.

        Returns:
            A :class:`RationalQuadraticSpline`, or for ``periodic``
            ``Compose(CircularShift(shift), spline)``.

        Raises:
            ValueError: if the last axis of ``raw`` is not ``3K + 1`` for some ``K ≥ 1``.
        """
        n_raw = raw.shape[-1]
        if n_raw < 4 or (n_raw - 1) % 3 != 0:
            raise FlowforceError(f"spline needs 3K + 1 raw parameters per dimension (K ≥ 1), got {n_raw}")
        k = (n_raw - 1) // 3
        self._check_bins(k)

        widths = self._bin_sizes(raw[..., :k])
        heights = self._bin_sizes(raw[..., k : 2 * k])
        if not periodic:
            derivatives = self._derivatives(raw[..., 2 * k :])
            return RationalQuadraticSpline(widths, heights, derivatives)

        inner = self._derivatives(raw[..., 2 * k : 3 * k])
        # One shared derivative at 0 and 1: with 0 ↦ 0 and 1 ↦ 1 this makes the map C¹ on
        # the circle.
        derivatives = torch.cat([inner, inner[..., :1]], dim=-1)
        shift = torch.remainder(raw[..., 3 * k], 1.0)
        return Compose(CircularShift(shift), RationalQuadraticSpline(widths, heights, derivatives))

    def identity_raw(self, n_components: int, periodic: bool) -> Tensor:
        """All-zero raw parameters ``(3K + 1,)``: uniform bins, derivatives 1, no shift.

        The transform is the identity up to floating-point rounding (≈ 1e-16 in float64).
        """
        return torch.zeros(self.n_params(n_components, periodic))

    @staticmethod
    def _check_bins(n_bins: int) -> None:
        if n_bins < 1 or n_bins * MIN_BIN >= 1.0:
            raise FlowforceError(
                f"spline needs 1 ≤ K < {int(round(1.0 / MIN_BIN))} bins (MIN_BIN = {MIN_BIN}), got {n_bins}"
            )

    @staticmethod
    def _bin_sizes(logits: Tensor) -> Tensor:
        k = logits.shape[-1]
        return MIN_BIN + (1.0 - k * MIN_BIN) * torch.softmax(logits, dim=-1)

    @classmethod
    def _derivatives(cls, raw: Tensor) -> Tensor:
        return MIN_DERIVATIVE + F.softplus(raw + cls._DERIVATIVE_OFFSET)


register_family(SplineFamily())
