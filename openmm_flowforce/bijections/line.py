"""Elementwise monotone transforms of the whole real line ℝ, and their family registry.

The unit-cube families of :mod:`.base` (``"smooth"``, ``"spline"``) map [0, 1] onto
itself. Flows whose coordinates live on ℝ and are not squashed into a cube (the local
frame coordinates of :mod:`openmm_flowforce.flows.equivariant`) need transforms of ℝ:

* ``"affine"``: ``y = e^s·x + t``; C∞, analytic inverse.
* ``"smooth"``: the affine map followed by the logit-conjugated smooth mixture

      y = logit f(sigmoid(x)),        f(u) = (1 − c)·Σ_k w_k σ(a_k(u − b_k) + ½) + c·u,

  with σ the C∞ smooth step of Köhler, Krämer, Noé, "Smooth normalizing flows",
  NeurIPS 2021, arXiv 2110.00351 (:func:`~.smooth.smooth_step`). Every component is kept
  whole inside [0, 1] (``a_k ≥ 1``, ``1/(2a_k) ≤ b_k ≤ 1 − 1/(2a_k)``, as the circle
  transforms of :mod:`.smooth` do), so f(u) = c·u exactly near u = 0 and
  f(u) = 1 − c·(1 − u) exactly near 1: far out the map is the translation
  ``y ≈ x ± log c`` and never saturates, and f, 1 − f are computed without cancellation
  (``1 − σ(τ) = σ(1 − τ)``). The inverse brackets x around y (widening the bracket
  until it holds) and solves by :func:`~.rootfind.invert_monotone` (bisection, Newton,
  implicit gradients). The map is C∞ with slope in (0, ∞).

A family turns unconstrained parameters ``raw (..., n_params)`` into a
:class:`~.base.Bijection` acting elementwise on tensors of shape ``raw.shape[:-1]`` whose
first dimension is the batch; ``ladj`` is summed over all other dimensions.
"""
from __future__ import annotations

import math

import torch

from .base import Bijection, Compose
from .rootfind import invert_monotone
from .smooth import MIN_BLEND, smooth_step
from ..errors import FlowforceError

Tensor = torch.Tensor

#: Largest |log e^s| of the affine part: scales stay within e^±5.
MAX_LOG_SCALE = 5.0
#: Largest log(a − 1) of a mixture component (steps no narrower than ~1/3000 of [0, 1]).
MAX_LOG_A = 8.0


def _sum_batch(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1).sum(-1)


class Affine(Bijection):
    """``y = exp(log_scale)·x + shift`` elementwise (parameters shaped like x)."""

    def __init__(self, log_scale: Tensor, shift: Tensor):
        self.log_scale, self.shift = log_scale, shift

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x * torch.exp(self.log_scale) + self.shift, _sum_batch(self.log_scale.expand_as(x))

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return (y - self.shift) * torch.exp(-self.log_scale), -_sum_batch(self.log_scale.expand_as(y))


def logit_mixture(t: Tensor, a: Tensor, b: Tensor, w: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """``g(t) = logit f(sigmoid(t))`` and ``log g'(t)``, elementwise (see the module docstring).

    Args:
        t: (...) points of ℝ.
        a, b, w: (..., K) inverse widths (≥ 1), centres and weights (summing to 1) of whole
            components.
        c: (...) identity blend in (0, 1).
    """
    u, v = torch.sigmoid(t), torch.sigmoid(-t)          # u and 1 − u, each without cancellation
    arg = a * (u.unsqueeze(-1) - b) + 0.5
    s, ds = smooth_step(arg)
    s_comp, _ = smooth_step(1.0 - arg)                   # 1 − σ(τ) = σ(1 − τ)
    f = (1.0 - c) * (w * s).sum(-1) + c * u
    one_minus_f = (1.0 - c) * (w * s_comp).sum(-1) + c * v
    df = (1.0 - c) * (w * a * ds).sum(-1) + c
    g = torch.log(f) - torch.log(one_minus_f)
    log_dg = torch.log(df) + torch.nn.functional.logsigmoid(t) + torch.nn.functional.logsigmoid(-t) \
        - torch.log(f) - torch.log(one_minus_f)
    return g, log_dg


def _logit_mixture_on_bracket(tau: Tensor, low: Tensor, width: Tensor, a: Tensor, b: Tensor, w: Tensor,
                              c: Tensor) -> tuple[Tensor, Tensor]:
    """``g(low + width·τ)`` and its τ-derivative: the monotone map of [0, 1] that the root
    finder inverts (the bracket is detached; the solution does not depend on it)."""
    g, log_dg = logit_mixture(low + width * tau, a, b, w, c)
    return g, torch.exp(log_dg) * width


class LogitMixture(Bijection):
    """``y = logit f(sigmoid(x))`` elementwise; parameters from :class:`LineSmoothFamily`.

    Args:
        a, b, w: (..., K) component parameters (whole components), c: (...) blend.
    """

    def __init__(self, a: Tensor, b: Tensor, w: Tensor, c: Tensor):
        self.params = (a, b, w, c)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y, log_dy = logit_mixture(x, *self.params)
        return y, _sum_batch(log_dy)

    @torch.no_grad()
    def _bracket(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(low, width)`` with g(low) ≤ y ≤ g(low + width), elementwise.

        Far out g(t) = t ± log c, but a component ending just short of u = 1 (or starting
        just after 0) delays that, so the bracket starts at ``y ± (|log c| + 1)`` and is
        widened geometrically until it holds.
        """
        step = -torch.log(self.params[3]).expand_as(y) + 1.0
        low, high = y - step, y + step
        for _ in range(60):
            below_low = logit_mixture(low, *self.params)[0] > y
            above_high = logit_mixture(high, *self.params)[0] < y
            if not bool(below_low.any() or above_high.any()):
                break
            step = 2.0 * step
            low = torch.where(below_low, low - step, low)
            high = torch.where(above_high, high + step, high)
        return low, high - low

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        low, width = self._bracket(y.detach())
        tau = invert_monotone(_logit_mixture_on_bracket, y, low, width, *self.params)
        x = low + width * tau
        _, log_dy = logit_mixture(x, *self.params)
        return x, -_sum_batch(log_dy)


class LineFamily:
    """A family of elementwise monotone transforms of ℝ built from conditioner outputs."""

    name: str = ""

    def n_params(self, n_components: int) -> int:
        raise NotImplementedError

    def build(self, raw: Tensor) -> Bijection:
        raise NotImplementedError

    def identity_raw(self, n_components: int) -> Tensor:
        """Unconstrained parameters ``(n_params,)`` of (close to) the identity map."""
        raise NotImplementedError


def _affine(raw: Tensor) -> Affine:
    log_scale = MAX_LOG_SCALE * torch.tanh(raw[..., 0] / MAX_LOG_SCALE)  # bounded, ≈ raw near 0
    return Affine(log_scale, raw[..., 1])


class LineAffineFamily(LineFamily):
    """``"affine"``: per element a raw log-scale (soft-bounded to ±5) and a shift."""

    name = "affine"

    def n_params(self, n_components: int) -> int:
        return 2

    def build(self, raw: Tensor) -> Bijection:
        return _affine(raw)

    def identity_raw(self, n_components: int) -> Tensor:
        return torch.zeros(2)


class LineSmoothFamily(LineFamily):
    """``"smooth"``: affine, then the logit-conjugated smooth mixture of K whole components.

    Layout: raw log-scale, shift, K raw inverse widths, K raw centres, K weight logits,
    one raw blend.
    """

    name = "smooth"

    def n_params(self, n_components: int) -> int:
        return 3 + 3 * n_components

    def build(self, raw: Tensor) -> Bijection:
        k = (raw.shape[-1] - 3) // 3
        body = raw[..., 2:]
        a = 1.0 + torch.exp(body[..., :k].clamp(max=MAX_LOG_A))
        b = 0.5 / a + (1.0 - 1.0 / a) * torch.sigmoid(body[..., k:2 * k])
        w = torch.softmax(body[..., 2 * k:3 * k], dim=-1)
        c = MIN_BLEND + (1.0 - MIN_BLEND) * torch.sigmoid(body[..., 3 * k])
        return Compose(_affine(raw[..., :2]), LogitMixture(a, b, w, c))

    def identity_raw(self, n_components: int) -> Tensor:
        """Affine identity; blend c ≈ 0.99, centres spread evenly: slope within ~1 ± 0.01."""
        k = n_components
        centres = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        # b = 0.5/a + (1 − 1/a)·sigmoid(raw) with a = 2 at raw width 0: solve for raw.
        b_raw = torch.logit(((centres - 0.25) / 0.5).clamp(1e-3, 1 - 1e-3))
        return torch.cat([torch.zeros(2), torch.zeros(k), b_raw, torch.zeros(k),
                          torch.tensor([math.log(99.0)], dtype=torch.float64)]).to(torch.get_default_dtype())


_LINE_FAMILIES: dict[str, LineFamily] = {}


def register_line_family(family: LineFamily) -> LineFamily:
    _LINE_FAMILIES[family.name] = family
    return family


def get_line_family(name: str) -> LineFamily:
    """The transform family of ℝ called ``name``; unknown names list the valid ones."""
    try:
        return _LINE_FAMILIES[name]
    except KeyError:
        raise FlowforceError(f"unknown real-line transform {name!r}; valid names: "
                             f"{', '.join(sorted(_LINE_FAMILIES))}") from None


def line_family_names() -> tuple[str, ...]:
    return tuple(sorted(_LINE_FAMILIES))


register_line_family(LineAffineFamily())
register_line_family(LineSmoothFamily())
