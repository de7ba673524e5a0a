"""C∞ mixture transforms of the interval [0, 1] and of the circle.

Köhler, Krämer, Noé, "Smooth normalizing flows", NeurIPS 2021, arXiv 2110.00351, Sec. 3.

Building blocks (``α > 0`` fixed):

* ramp ``r(t) = exp(−α/t)`` for ``t > 0`` and 0 otherwise: C∞, all derivatives vanish at 0;
* smooth step ``σ(t) = r(t) / (r(t) + r(1 − t))`` = sigmoid(α/(1−t) − α/t) on (0, 1),
  0 below and 1 above: C∞, monotone, with every derivative zero at t = 0 and t = 1;
* component ``g_k(x) = [σ(a_k(x − b_k) + ½) − σ(t⁰_k)] / [σ(t¹_k) − σ(t⁰_k)]``, with
  ``t⁰_k, t¹_k`` its arguments at x = 0 and x = 1: a step of width 1/a_k centred at b_k,
  renormalised to map [0, 1] onto [0, 1];
* transform ``f(x) = (1 − c)·Σ_k w_k g_k(x) + c·x`` with softmax weights w and
  ``0 < c < 1``: strictly monotone with slope ≥ c, C∞, f(0) = 0, f(1) = 1.

On the circle the components are kept whole inside [0, 1] (``a_k ≥ 1`` and
``1/(2a_k) ≤ b_k ≤ 1 − 1/(2a_k)``), so each g_k is exactly 0 near x = 0 and exactly 1
near x = 1: f − x is then smooth and periodic with all derivatives equal at both ends.
The circle transform is a learned rotation followed by f (``shift ∘ interval transform``),
so the map, the density and all their derivatives are continuous across the boundary.

The map x → y is analytic; its inverse uses root finding
(:func:`~openmm_flowforce.bijections.rootfind.invert_monotone`).
"""
from __future__ import annotations

import math

import torch

from .base import Bijection, CircularShift, Compose, ElementwiseFamily, register_family
from .rootfind import invert_monotone

Tensor = torch.Tensor

#: Sharpness of the ramp exp(−α/t).
ALPHA = 1.0
#: Smallest identity blend c: the slope of every transform is at least this.
MIN_BLEND = 1e-3
#: Interval: smallest inverse width of a component.
MIN_SLOPE_A = 0.5
#: Largest log(a − a_min): steps no narrower than ~1/3000 of the interval.
MAX_LOG_A = 8.0
#: t is clamped this far inside (0, 1) before the ramp is evaluated; σ there is exactly 0 / 1.
_T_EPS = 1e-6


def smooth_step(t: Tensor, alpha: float = ALPHA) -> tuple[Tensor, Tensor]:
    """The C∞ step σ(t) and its derivative σ'(t), elementwise.

    σ(t) = sigmoid(α/(1−t) − α/t) on (0, 1), 0 for t ≤ 0, 1 for t ≥ 1;
    σ'(t) = σ(t)·(1 − σ(t))·(α/(1−t)² + α/t²).
    """
    ts = t.clamp(_T_EPS, 1.0 - _T_EPS)
    h = alpha / (1.0 - ts) - alpha / ts
    s = torch.sigmoid(h)
    # sigmoid(h)·sigmoid(−h) rather than s·(1 − s): no cancellation near t = 1.
    ds = s * torch.sigmoid(-h) * (alpha / (1.0 - ts) ** 2 + alpha / ts ** 2)
    zero = torch.zeros_like(t)
    value = torch.where(t <= 0.0, zero, torch.where(t >= 1.0, torch.ones_like(t), s))
    deriv = torch.where((t <= 0.0) | (t >= 1.0), zero, ds)
    return value, deriv


def smooth_mixture(x: Tensor, a: Tensor, b: Tensor, w: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """Evaluate the mixture transform and its slope, elementwise.

    Args:
        x: (...,) points in [0, 1].
        a: (..., K) inverse widths, > 0.
        b: (..., K) centres in (0, 1).
        w: (..., K) mixture weights, positive, summing to 1.
        c: (...,) identity blend in (0, 1).

    Returns:
        ``(f(x), f'(x))``, both shaped like x.
    """
    xk = x.unsqueeze(-1)
    s, ds = smooth_step(a * (xk - b) + 0.5)
    s0, _ = smooth_step(0.5 - a * b)
    s1, _ = smooth_step(a * (1.0 - b) + 0.5)
    norm = s1 - s0
    mix = (w * (s - s0) / norm).sum(-1)
    dmix = (w * a * ds / norm).sum(-1)
    return (1.0 - c) * mix + c * x, (1.0 - c) * dmix + c


class SmoothMixture(Bijection):
    """Elementwise smooth mixture transform of [0, 1], parameters already constrained.

    Args:
        a, b, w: (B, D, K) inverse widths, centres and weights (see :func:`smooth_mixture`).
        c: (B, D) identity blend.
    """

    def __init__(self, a: Tensor, b: Tensor, w: Tensor, c: Tensor):
        self.params = (a, b, w, c)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y, dy = smooth_mixture(x, *self.params)
        return y, torch.log(dy).sum(-1)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x = invert_monotone(smooth_mixture, y, *self.params)
        _, dy = smooth_mixture(x, *self.params)
        return x, -torch.log(dy).sum(-1)


class SmoothFamily(ElementwiseFamily):
    """Builds smooth mixture transforms from unconstrained conditioner outputs.

    Parameter layout per dimension: K raw inverse widths, K raw centres, K weight logits,
    one raw blend, and on the circle one more raw shift (shift = raw mod 1).
    """

    name = "smooth"

    def n_params(self, n_components: int, periodic: bool) -> int:
        return 3 * n_components + (2 if periodic else 1)

    def build(self, raw: Tensor, periodic: bool) -> Bijection:
        k = (raw.shape[-1] - (2 if periodic else 1)) // 3
        a_raw, b_raw, w_raw = raw[..., :k], raw[..., k:2 * k], raw[..., 2 * k:3 * k]
        w = torch.softmax(w_raw, dim=-1)
        c = MIN_BLEND + (1.0 - MIN_BLEND) * torch.sigmoid(raw[..., 3 * k])
        # Inverse widths on a log scale: an optimiser step changes a by a factor, so narrow
        # features (a peak a few degrees wide on a torsion) are reachable in a few hundred steps.
        scale = torch.exp(a_raw.clamp(max=MAX_LOG_A))
        if not periodic:
            a = MIN_SLOPE_A + scale
            b = torch.sigmoid(b_raw)
            return SmoothMixture(a, b, w, c)
        # Whole steps inside [0, 1]: exactly flat near both ends, so f − x is periodic.
        a = 1.0 + scale
        b = 0.5 / a + (1.0 - 1.0 / a) * torch.sigmoid(b_raw)
        shift = torch.remainder(raw[..., 3 * k + 1], 1.0)
        return Compose(CircularShift(shift), SmoothMixture(a, b, w, c))

    def identity_raw(self, n_components: int, periodic: bool) -> Tensor:
        """Near-identity: centres spread evenly, blend c ≈ 0.99 so the slope is within 1 ± 0.01.

        Closer to the identity than the usual c ≈ 0.5: in molecular coordinates the unit
        cube magnifies thermal fluctuations, and the steps of a mixture far from the identity
        make an untrained flow potential stiff (Verlet then drifts). Adam rescales the
        small initial gradients of the mixture parameters.
        """
        k = n_components
        centres = (torch.arange(k, dtype=torch.get_default_dtype()) + 0.5) / k
        b_raw = torch.logit(centres)
        a_raw = torch.zeros(k)  # a = MIN_SLOPE_A + 1 (interval), 2 (circle)
        tail = [math.log(99.0)] + ([0.0] if periodic else [])
        return torch.cat([a_raw, b_raw, torch.zeros(k), torch.tensor(tail)])


register_family(SmoothFamily())
