"""Inversion of elementwise monotone maps of [0, 1] by root finding, with implicit gradients.

The inverse ``x = f⁻¹(y; θ)`` is found by bisection on the bracket [0, 1] followed by
Newton steps kept inside the bracket. Its gradients come from the inverse function
theorem, using forward evaluations of ``f`` at the solution only:

    ∂x/∂y = 1 / f'(x),        ∂x/∂θ = −(∂f/∂θ)(x) / f'(x),

so nothing is differentiated through the iterations (Köhler, Krämer, Noé, "Smooth
normalizing flows", NeurIPS 2021, arXiv 2110.00351, Sec. 3.3).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.autograd.function import once_differentiable

Tensor = torch.Tensor
#: ``fn(x, *params) -> (y, dy/dx)``, elementwise, monotone increasing in x on [0, 1].
MonotoneFn = Callable[..., tuple[Tensor, Tensor]]


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 1e-6


@torch.no_grad()
def solve_monotone(fn: MonotoneFn, y: Tensor, params: tuple[Tensor, ...],
                   lower: float = 0.0, upper: float = 1.0) -> Tensor:
    """Solve ``fn(x, *params)[0] = y`` for x in [lower, upper], elementwise.

    Bisection narrows the bracket to 2⁻¹² of its width (enough for Newton's method to
    converge quadratically on a function whose slope is bounded below); Newton steps then
    polish to the dtype's tolerance (1e-12 in float64, 1e-6 in float32). Steps that
    would leave the bracket are replaced by bisection steps.
    """
    lo = torch.full_like(y, lower)
    hi = torch.full_like(y, upper)
    for _ in range(12):
        mid = 0.5 * (lo + hi)
        below = fn(mid, *params)[0] < y
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    x = 0.5 * (lo + hi)
    tol = _tolerance(y.dtype)
    for _ in range(30):
        fx, dfx = fn(x, *params)
        done = (fx - y).abs() <= tol
        if bool(done.all()):
            break
        below = fx < y
        lo = torch.where(below, x, lo)
        hi = torch.where(below, hi, x)
        step = x - (fx - y) / dfx
        inside = (step >= lo) & (step <= hi)
        x = torch.where(done, x, torch.where(inside, step, 0.5 * (lo + hi)))
    return x


class _MonotoneInverse(torch.autograd.Function):
    """x = f⁻¹(y; θ) with backward from the inverse function theorem."""

    @staticmethod
    def forward(ctx, fn: MonotoneFn, y: Tensor, *params: Tensor) -> Tensor:
        x = solve_monotone(fn, y, params)
        ctx.fn = fn
        ctx.save_for_backward(x, *params)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x: Tensor):
        x, *params = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(p.requires_grad) for p in params]
            y, dydx = ctx.fn(x.detach(), *leaves)
            grad_y = grad_x / dydx.detach()
            needs = [p for p in leaves if p.requires_grad]
            grads_needed = torch.autograd.grad(y, needs, -grad_y, allow_unused=True) if needs else ()
        it = iter(grads_needed)
        grads = [next(it) if p.requires_grad else None for p in leaves]
        return (None, grad_y, *grads)


def invert_monotone(fn: MonotoneFn, y: Tensor, *params: Tensor) -> Tensor:
    """Differentiable elementwise inverse of a monotone map of [0, 1] onto [0, 1].

    Args:
        fn: ``fn(x, *params) -> (y, dy/dx)``, elementwise and increasing in ``x``.
        y: values in [0, 1], any shape broadcastable with the parameters' leading dims.
        params: parameter tensors passed to ``fn``; gradients reach each of them.

    Returns:
        ``x`` with ``fn(x, *params)[0] == y`` to 1e-12 (float64) or 1e-6 (float32).
    """
    return _MonotoneInverse.apply(fn, y, *params)
