"""Stochastic layers of stochastic normalizing flows: Langevin and Metropolis–Hastings.

Wu, Köhler, Noé, "Stochastic Normalizing Flows", NeurIPS 2020, arXiv 2002.06707. A
stochastic layer draws ``x' ~ F(x → ·)`` and reports the log ratio of the backward to the
forward path probability,

    ΔS(x, x') = log B(x' → x) − log F(x → x'),

which plays the role of the log-Jacobian of a deterministic layer: for a chain
x₀ ~ q₀ → … → x_K the importance weight of the path with respect to exp(−u) is

    log w = −u(x_K) − log q₀(x₀) + Σ_k ΔS_k − Σ_k log|det J_k|

(J_k the deterministic layers), and E[w] = Z for *any* pair of kernels F, B, so log Z and
reweighting stay exact whatever the layers' step sizes. Every layer here uses its own
kernel as the backward kernel (B = F as a family of kernels), so running a layer from
x' and negating its ΔS gives a sample of B(x' → ·) and the ΔS of the forward path
(how :class:`~openmm_flowforce.samplers.snf.StochasticNormalizingFlow` evaluates data).

Each layer works at an intermediate energy ``U_λ = (1 − λ)·u₀ + λ·u₁`` (u₀ the prior's,
u₁ the target's, both reduced); :class:`EnergyPoint` caches u₀, u₁ and their gradients
at the current points so a Langevin step costs one evaluation of each.

* Overdamped Langevin, ``x' = x − ε∇U(x) + sqrt(2ε)·η``:
  ``ΔS = −|x − x' + ε∇U(x')|²/(4ε) + |η|²/2``.
* Underdamped Langevin (OBABO, unit mass, friction γ): velocities v ~ N(0, I) are drawn
  at the layer's entry and dropped at its exit (the backward path draws its own). The O
  steps satisfy detailed balance for N(0, I) and the BAB steps are volume preserving and
  reversible under v → −v, so the ratio reduces to ``ΔS = −Σ_BAB ΔK`` (the kinetic
  energy gained in the deterministic steps, K = |v|²/2).
* Metropolis–Hastings with a Gaussian random-walk proposal of width σ: a kernel in
  detailed balance with exp(−U_λ) gives ``ΔS = U_λ(x') − U_λ(x)``, accepted or not.

For particle systems the noise, the drifts and the proposals are projected onto the
zero-centre-of-mass hyperplane (:class:`~openmm_flowforce.samplers.transport.GaussianPrior`),
so chains stay on it. Drifts are clamped to ±:data:`~openmm_flowforce.samplers.ais.MAX_GRAD`
and NaNs zeroed, as in the HMC of :mod:`~openmm_flowforce.samplers.ais`: F and B use the
same clamped drift, so the weights stay exact.

Gradients: with ``create_graph`` the drifts are differentiable (double backward through the
target, the reparameterisation gradient of the paper); targets that cannot be
differentiated twice (OpenMM) pass ``create_graph=False``, which treats the forces as
constants in the parameter gradient (the weights are still exact). Metropolis–Hastings
accept/reject decisions carry no gradient (as in the paper).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import FlowforceError
from .ais import MAX_GRAD
from .transport import GaussianPrior

Tensor = torch.Tensor


@dataclass
class EnergyPoint:
    """Points ``x (B, D)`` with the prior and target energies ``(B,)`` and gradients ``(B, D)``."""

    x: Tensor
    u0: Tensor
    u1: Tensor
    g0: Tensor
    g1: Tensor

    def energy(self, lam: float) -> Tensor:
        return self.u0 if lam == 0.0 else self.u1 if lam == 1.0 else (1.0 - lam) * self.u0 + lam * self.u1

    def grad(self, lam: float) -> Tensor:
        g = self.g0 if lam == 0.0 else self.g1 if lam == 1.0 else (1.0 - lam) * self.g0 + lam * self.g1
        return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0).clamp(-MAX_GRAD, MAX_GRAD)

    def where(self, keep_new: Tensor, new: "EnergyPoint") -> "EnergyPoint":
        k1 = keep_new[:, None]
        return EnergyPoint(torch.where(k1, new.x, self.x), torch.where(keep_new, new.u0, self.u0),
                           torch.where(keep_new, new.u1, self.u1), torch.where(k1, new.g0, self.g0),
                           torch.where(k1, new.g1, self.g1))


#: ``x -> EnergyPoint``: evaluates u₀, u₁ and their (projected) gradients at x.
Evaluator = Callable[[Tensor], EnergyPoint]


def make_evaluator(prior_energy: Callable[[Tensor], Tensor], target_energy: Callable[[Tensor], Tensor],
                   prior: GaussianPrior, create_graph: bool) -> Evaluator:
    """An :data:`Evaluator` for ``u₀ = prior_energy``, ``u₁ = target_energy``.

    When ``x`` requires grad (a reparameterised path) the energies stay in its autograd
    graph; the gradients do too when ``create_graph`` (differentiable drifts), and are
    constants otherwise. Points that do not require grad give detached values.
    """

    def evaluate(x: Tensor) -> EnergyPoint:
        tracked = x.requires_grad
        with torch.enable_grad():
            xi = x if tracked else x.detach().requires_grad_(True)
            u0, u1 = prior_energy(xi), target_energy(xi)
            (g0,) = torch.autograd.grad(u0.sum(), xi, create_graph=create_graph, retain_graph=True)
            (g1,) = torch.autograd.grad(u1.sum(), xi, create_graph=create_graph,
                                        retain_graph=tracked or create_graph)
        if not tracked:
            u0, u1 = u0.detach(), u1.detach()
        if not create_graph:
            g0, g1 = g0.detach(), g1.detach()
        return EnergyPoint(x, u0, u1, prior.project(g0), prior.project(g1))

    return evaluate


class StochasticLayer(nn.Module):
    """A stochastic layer at interpolation ``lam`` with ``n_steps`` moves of size ``step_size``.

    The step size is a parameter (stored as its log) and learnable when ``learn_step``.
    """

    def __init__(self, lam: float, n_steps: int, step_size: float, learn_step: bool = True):
        super().__init__()
        if not 0.0 <= float(lam) <= 1.0:
            raise FlowforceError(f"a stochastic layer's λ must lie in [0, 1], got {lam!r}")
        if int(n_steps) < 0:
            raise FlowforceError(f"a stochastic layer needs n_steps ≥ 0, got {n_steps!r}")
        if not (math.isfinite(float(step_size)) and float(step_size) > 0):
            raise FlowforceError(f"step_size must be a positive number, got {step_size!r}")
        self.lam, self.n_steps = float(lam), int(n_steps)
        self.log_step = nn.Parameter(torch.tensor(math.log(float(step_size)), dtype=torch.float64),
                                     requires_grad=bool(learn_step))
        #: mean acceptance (MH) of the last call, for diagnostics
        self.last_accept = math.nan

    def forward(self, point: EnergyPoint, evaluate: Evaluator, prior: GaussianPrior) -> tuple[EnergyPoint, Tensor]:
        """Move ``point``; returns the new point and ``ΔS (B,)`` (see the module docstring)."""
        raise NotImplementedError


class OverdampedLangevin(StochasticLayer):
    """``x' = x − ε∇U_λ(x) + sqrt(2ε)η`` (no accept/reject); ε = ``step_size``."""

    def forward(self, point, evaluate, prior):
        eps = self.log_step.exp()
        delta = torch.zeros_like(point.u1)
        for _ in range(self.n_steps):
            eta = prior.noise(point.x)
            new = evaluate(point.x - eps * point.grad(self.lam) + torch.sqrt(2.0 * eps) * eta)
            back = point.x - new.x + eps * new.grad(self.lam)
            delta = delta - prior.sq_norm(back) / (4.0 * eps) + 0.5 * prior.sq_norm(eta)
            point = new
        return point, delta


class UnderdampedLangevin(StochasticLayer):
    """OBABO Langevin dynamics, unit mass, leapfrog step ε = ``step_size``, friction γ
    (O step ``v ← a·v + sqrt(1 − a²)·η`` with a = exp(−γε/2))."""

    def __init__(self, lam: float, n_steps: int, step_size: float, learn_step: bool = True, friction: float = 1.0):
        super().__init__(lam, n_steps, step_size, learn_step)
        if not (math.isfinite(float(friction)) and float(friction) >= 0):
            raise FlowforceError(f"friction must be a non-negative number, got {friction!r}")
        self.friction = float(friction)

    def forward(self, point, evaluate, prior):
        eps = self.log_step.exp()
        a = torch.exp(-0.5 * self.friction * eps)
        b = torch.sqrt(1.0 - a * a)
        v = prior.noise(point.x)
        delta = torch.zeros_like(point.u1)
        for _ in range(self.n_steps):
            v = a * v + b * prior.noise(v)
            kinetic = 0.5 * prior.sq_norm(v)
            v = v - 0.5 * eps * point.grad(self.lam)
            point = evaluate(point.x + eps * v)
            v = v - 0.5 * eps * point.grad(self.lam)
            delta = delta - (0.5 * prior.sq_norm(v) - kinetic)
            v = a * v + b * prior.noise(v)
        return point, delta


class MetropolisHastings(StochasticLayer):
    """Random-walk Metropolis–Hastings at U_λ, proposal ``x + σ·η``, σ = ``step_size``."""

    def forward(self, point, evaluate, prior):
        sigma = self.log_step.exp()
        start = point.energy(self.lam)
        accepted = []
        for _ in range(self.n_steps):
            proposal = evaluate(point.x + sigma * prior.noise(point.x))
            log_ratio = (point.energy(self.lam) - proposal.energy(self.lam)).detach()
            log_ratio = torch.where(torch.isfinite(log_ratio), log_ratio, torch.full_like(log_ratio, -math.inf))
            accept = torch.rand_like(log_ratio) < log_ratio.clamp(max=0.0).exp()
            point = point.where(accept, proposal)
            accepted.append(float(accept.double().mean()))
        self.last_accept = sum(accepted) / len(accepted) if accepted else math.nan
        return point, point.energy(self.lam) - start


#: Registry of stochastic layer kinds (SNF option ``layer``).
STOCHASTIC_LAYERS: dict[str, type[StochasticLayer]] = {
    "overdamped": OverdampedLangevin, "underdamped": UnderdampedLangevin, "mh": MetropolisHastings,
}


def make_layer(kind: str, lam: float, n_steps: int, step_size: float, learn_step: bool = True,
               friction: float = 1.0) -> StochasticLayer:
    """A stochastic layer of the registered ``kind``; unknown kinds list the valid ones."""
    if kind not in STOCHASTIC_LAYERS:
        raise FlowforceError(f"unknown stochastic layer {kind!r}; valid: {', '.join(STOCHASTIC_LAYERS)}")
    if kind == "underdamped":
        return UnderdampedLangevin(lam, n_steps, step_size, learn_step, friction)
    return STOCHASTIC_LAYERS[kind](lam, n_steps, step_size, learn_step)
