"""Monotone I-spline transforms of the interval [0, 1] and of the circle, C^s for a chosen s.

M-splines are B-splines normalised to unit integral; I-splines are their integrals
(Ramsay, "Monotone regression splines in action", Statistical Science 3, 1988), so a
positive combination of I-splines is monotone. Waveflow uses such transforms as the
elementwise maps of a flow (Thiede, Sun, Aspuru-Guzik, "Waveflow: enforcing boundary
conditions in smooth normalizing flows with application to fermionic wave functions", 2022,
arXiv:2211.14839).

With knots ``t_0 ≤ … ≤ t_T`` and order ``k`` (degree ``k − 1``), the B-splines
``B_{i,m}`` follow the Cox–de Boor recursion and

    M_{i,k}(x) = k·B_{i,k}(x) / (t_{i+k} − t_i),        ∫ M_{i,k} = 1,
    I_{i,k}(x) = ∫_{−∞}^x M_{i,k} = Σ_{l ≥ i} B_{l,k+1}(x),

the second identity because ``B'_{l,k+1} = M_{l,k} − M_{l+1,k}`` telescopes. With simple
interior knots ``M_{i,k}`` is C^{k−2}, so ``I_{i,k}`` is C^{k−1}: order ``k = s + 1`` gives
a C^s transform. The transform is

    f(x) = (1 − c)·Σ_j w_j I_j(x) + c·x,      f'(x) = (1 − c)·Σ_j w_j M_j(x) + c,

with softmax weights ``w`` and identity blend ``0 < c < 1``: f(0) = 0, f(1) = 1 and
``c ≤ f' ≤ c + (1 − c)·max_j M_j``, so the map is bi-Lipschitz with constants fixed by
the knots (its inverse cannot explode, unlike a spline whose bin slopes are free).

Knots are fixed and uniform (spacing ``h``); only ``w`` and ``c`` are learned, as in the
I-spline flows above.

* Interval: the clamped knot vector (0 and 1 repeated ``k + 1`` times, ``K − k`` interior
  knots), giving ``K`` I-splines that all rise from 0 to 1 on [0, 1]. The weights
  ``w_j = (t_{j+k} − t_j)/k`` give ``Σ_j w_j I_j(x) = x`` exactly (Greville abscissae).
* Circle: uniform knots on [0, 1] continued beyond it, and only the ``K`` M-splines whose
  support lies inside [0, 1]. Each vanishes at 0 and 1 together with its first ``k − 2``
  derivatives, so ``f'(0) = f'(1) = c`` and ``f^{(m)}(0) = f^{(m)}(1) = 0`` for
  ``2 ≤ m ≤ s``: f − x is periodic and C^s across the wrap, and the circle transform (a
  learned rotation, then f: shift ∘ interval transform) is a C^s diffeomorphism of the
  circle; its log-slope, hence the density and the forces of a flow potential, is
  C^{s−1} across the wrap. The slope at the wrap point is pinned to c; the rotation moves
  that point.

The map x → y is a piecewise polynomial evaluated directly; its inverse uses root finding
with implicit gradients (:func:`~openmm_flowforce.bijections.rootfind.invert_monotone`).
"""
from __future__ import annotations

import math

import torch

from ..errors import FlowforceError
from .base import Bijection, CircularShift, Compose, ElementwiseFamily, register_family
from .rootfind import invert_monotone

Tensor = torch.Tensor

#: Smallest identity blend c: every slope is at least this (the inverse is MIN_BLEND⁻¹-Lipschitz).
MIN_BLEND = 1e-3


def _safe_inverse(values: list[float]) -> list[float]:
    """1/v, and 0 where v = 0 (the 0/0 := 0 convention of the Cox–de Boor recursion)."""
    return [1.0 / v if v > 0 else 0.0 for v in values]


class KnotBasis:
    """Fixed knots of order ``k`` and the I-/M-spline basis functions a transform uses.

    Args:
        knots: non-decreasing knot positions ``t_0 … t_T`` (Python floats).
        order: M-spline order ``k ≥ 1`` (degree ``k − 1``; the I-splines are C^{k−1}).
        first, count: the basis functions used are ``j = first … first + count − 1``.

    The recursion runs over all knots; indices outside the used range only feed it.
    """

    def __init__(self, knots: list[float], order: int, first: int, count: int):
        self.knots = list(knots)
        self.order = order
        self.first, self.count = first, count
        t = self.knots
        n = len(t)
        # Per level m (order m + 1), the constants of B_{i,m+1} = (x − t_i)·α_i·B_{i,m} + (t_{i+m+1} − x)·β_i·B_{i+1,m}.
        self.levels = []
        for m in range(1, order + 1):
            idx = range(n - m - 1)
            alpha = _safe_inverse([t[i + m] - t[i] for i in idx])
            beta = _safe_inverse([t[i + m + 1] - t[i + 1] for i in idx])
            self.levels.append(([t[i] for i in idx], alpha, [t[i + m + 1] for i in idx], beta))
        k = order
        self.m_scale = [k * s for s in _safe_inverse([t[i + k] - t[i] for i in range(n - k)])]
        # Interval [t_i, t_{i+1}) is half open; the last non-empty one ending at max(t) is closed
        # so that x = 1 lies in a bin when the knots are clamped at 1.
        top = max(t)
        self.closed = [t[i + 1] == top and t[i] < t[i + 1] for i in range(n - 1)]
        self._cache: dict[tuple[torch.dtype, torch.device], tuple] = {}

    def _constants(self, dtype: torch.dtype, device: torch.device) -> tuple:
        """The knot constants as tensors, made once per dtype and device (the root finder
        evaluates the basis some 20 times per inverse)."""
        key = (dtype, device)
        if key not in self._cache:
            def const(values: list) -> Tensor:
                return torch.tensor(values, dtype=dtype, device=device)

            t = const(self.knots)
            levels = [tuple(const(v) for v in level) for level in self.levels]
            closed = torch.tensor(self.closed, device=device)
            self._cache[key] = (t[:-1], t[1:], closed, levels, const(self.m_scale))
        return self._cache[key]

    def evaluate(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """I-splines and M-splines of the used basis functions.

        Args:
            x: ``(...)`` points in [0, 1].

        Returns:
            ``I (..., count)`` in [0, 1] and ``M (..., count)`` ≥ 0 with ``dI/dx = M``.
        """
        lower, upper, closed, levels, m_scale = self._constants(x.dtype, x.device)
        xk = x.unsqueeze(-1)
        b = ((xk >= lower) & ((xk < upper) | ((xk == upper) & closed))).to(x.dtype)  # B_{i,1}
        m_spline = b
        for level, (left, alpha, right, beta) in enumerate(levels, start=1):
            if level == self.order:  # b holds B_{i,k}: the M-splines come from this level
                m_spline = b * m_scale
            b = (xk - left) * alpha * b[..., :-1] + (right - xk) * beta * b[..., 1:]
        # b holds B_{l,k+1}; I_j = Σ_{l ≥ j} B_{l,k+1} by a reversed cumulative sum (no cancellation).
        i_spline = torch.flip(torch.cumsum(torch.flip(b, (-1,)), -1), (-1,))
        used = slice(self.first, self.first + self.count)
        return i_spline[..., used], m_spline[..., used]


def clamped_basis(n_functions: int, order: int) -> KnotBasis:
    """``n_functions`` I-splines of order ``order`` on [0, 1], knots clamped at both ends."""
    n_interior = n_functions - order
    interior = [(i + 1) / (n_interior + 1) for i in range(n_interior)]
    knots = [0.0] * (order + 1) + interior + [1.0] * (order + 1)
    # j = 0 is the degenerate M-spline on [t_0, t_k] = [0, 0]; the K used ones follow it.
    return KnotBasis(knots, order, first=1, count=n_functions)


def interior_basis(n_functions: int, order: int) -> KnotBasis:
    """``n_functions`` uniform-knot I-splines whose M-splines lie inside [0, 1] (circle)."""
    n_intervals = n_functions + order - 1
    h = 1.0 / n_intervals
    # Knots continue past 1 so that Σ_{l≥j} B_{l,k+1} is complete on [0, 1]; M_j, j = 0 … K−1,
    # has support [j·h, (j+k)·h] ⊂ [0, 1].
    knots = [i * h for i in range(n_intervals + order + 2)]
    return KnotBasis(knots, order, first=0, count=n_functions)


def ispline_transform(x: Tensor, w: Tensor, c: Tensor, basis: KnotBasis) -> tuple[Tensor, Tensor]:
    """``f(x)`` and ``f'(x)``, elementwise.

    Args:
        x: ``(...)`` points in [0, 1].
        w: ``(..., K)`` weights, positive, summing to 1.
        c: ``(...)`` identity blend in (0, 1).
        basis: the fixed knots.

    Returns:
        ``(f(x), f'(x))``, both shaped like x.
    """
    # Inputs rounded an ulp outside [0, 1] would fall outside every knot interval of the
    # clamped basis (I = 0 there: a jump); clamping keeps them on the end values.
    i_spline, m_spline = basis.evaluate(x.clamp(0.0, 1.0))
    y = (1.0 - c) * (w * i_spline).sum(-1) + c * x
    # Rounding can leave y a few ulp outside [0, 1]; the coordinates downstream need [0, 1].
    return y.clamp(0.0, 1.0), (1.0 - c) * (w * m_spline).sum(-1) + c


class ISpline(Bijection):
    """Elementwise I-spline transform of [0, 1], parameters already constrained.

    Args:
        w: ``(B, D, K)`` positive weights summing to 1 over K.
        c: ``(B, D)`` identity blend in (0, 1).
        basis: the fixed knots (:func:`clamped_basis` or :func:`interior_basis`).
    """

    def __init__(self, w: Tensor, c: Tensor, basis: KnotBasis):
        self.w, self.c, self.basis = w, c, basis

    def _fn(self, x: Tensor, w: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        return ispline_transform(x, w, c, self.basis)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y, dy = self._fn(x, self.w, self.c)
        return y, torch.log(dy).sum(-1)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x = invert_monotone(self._fn, y, self.w, self.c)
        _, dy = self._fn(x, self.w, self.c)
        return x, -torch.log(dy).sum(-1)


class ISplineFamily(ElementwiseFamily):
    """I-spline transforms of smoothness C^s from unconstrained conditioner outputs.

    Parameter layout per dimension: ``K`` weight logits, one raw blend
    (``c = MIN_BLEND + (1 − MIN_BLEND)·sigmoid(raw)``) and, on the circle, one raw shift
    (``shift = raw mod 1``). ``K`` (``n_components``) must be at least ``s + 1``.

    Args:
        smoothness: s ≥ 1; the M-splines have order ``s + 1``.
        name: registry name.
    """

    def __init__(self, smoothness: int, name: str):
        if smoothness < 1:
            raise FlowforceError(f"I-spline smoothness must be at least 1 (C¹), got {smoothness}")
        self.smoothness = smoothness
        self.order = smoothness + 1
        self.name = name
        self._bases: dict[tuple[int, bool], KnotBasis] = {}

    def _basis(self, n_components: int, periodic: bool) -> KnotBasis:
        if n_components < self.order:
            raise FlowforceError(f"transform {self.name!r} (C^{self.smoothness}) needs n_components ≥ {self.order}, "
                                 f"got {n_components}; raise n_components or choose a less smooth I-spline")
        key = (n_components, periodic)
        if key not in self._bases:
            self._bases[key] = (interior_basis if periodic else clamped_basis)(n_components, self.order)
        return self._bases[key]

    def n_params(self, n_components: int, periodic: bool) -> int:
        self._basis(n_components, periodic)
        return n_components + (2 if periodic else 1)

    def build(self, raw: Tensor, periodic: bool) -> Bijection:
        k = raw.shape[-1] - (2 if periodic else 1)
        basis = self._basis(k, periodic)
        w = torch.softmax(raw[..., :k], dim=-1)
        c = MIN_BLEND + (1.0 - MIN_BLEND) * torch.sigmoid(raw[..., k])
        if not periodic:
            return ISpline(w, c, basis)
        shift = torch.remainder(raw[..., k + 1], 1.0)
        return Compose(CircularShift(shift), ISpline(w, c, basis))

    def identity_raw(self, n_components: int, periodic: bool) -> Tensor:
        """Interval: the Greville weights, exactly the identity for any blend (c = ½ here,
        so half the slope is learnable from the start). Circle: uniform weights and
        c = 0.99, slope within 1 ± 0.01·max M_j (no exact identity: f'(0) = c)."""
        basis = self._basis(n_components, periodic)
        if periodic:
            return torch.cat([torch.zeros(n_components), torch.tensor([math.log(99.0), 0.0])])
        t, k = basis.knots, basis.order
        greville = [(t[j + k] - t[j]) / k for j in range(basis.first, basis.first + n_components)]
        return torch.cat([torch.log(torch.tensor(greville)), torch.zeros(1)])


#: "ispline" is C³: the flow potential's forces are then C² (smooth enough for Verlet);
#: "ispline-cS" chooses the smoothness S.
for _s in (1, 2, 3, 4):
    register_family(ISplineFamily(_s, f"ispline-c{_s}"))
register_family(ISplineFamily(3, "ispline"))
