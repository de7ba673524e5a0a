"""Hamiltonian Monte Carlo and annealed importance sampling (AIS), pure torch.

Both work on a batch of independent chains ``x (B, D)`` and on *joint log densities*: a
callable ``log_densities(x) -> (log π₀, log π₁, ∇log π₀, ∇log π₁)`` giving, at every
point, the log of the (normalised) initial density π₀ and of the unnormalised final
density π₁ with their gradients. The annealing path is geometric,

    log f_β(x) = (1 − β)·log π₀(x) + β·log π₁(x),        0 = β₀ < β₁ < … < β_K = 1,

so caching the four values at the current point gives every f_β and its gradient for
free: each HMC leapfrog step costs one call.

AIS (Neal 2001, "Annealed importance sampling", Statistics and Computing 11, arXiv
physics/9803008). With x₀ ~ π₀ and, for j = 1 … K, first

    log w += (β_j − β_{j−1})·[log π₁(x) − log π₀(x)]

and then one or more HMC transitions leaving f_{β_j} invariant, E[w] = Z₁/Z₀ = Z₁ and
``Σ w·h(x) / Σ w`` estimates E_{π₁/Z₁}[h]. The transition at the last level (β = 1) comes
after the last weight update, so it only moves samples towards π₁ and leaves the weights
valid.

HMC (Duane et al. 1987; Neal 2011, arXiv 1206.1901): unit mass, ``n_leapfrog`` leapfrog
steps, Metropolis–Hastings correction with the exact energies. Gradients are clamped to
±``MAX_GRAD`` and NaNs zeroed before use: leapfrog with any position-dependent force is
still volume preserving and reversible, so the MH step keeps the chain exact while the
clamp prevents overflow in the first steps from a poor flow (fab-torch clamps alike).
Proposals whose energy is not finite are rejected.

Step-size adaptation as in FAB (Midgley et al. 2023, arXiv 2208.01893, App.; fab-torch
``HamiltonianMonteCarlo.adjust_step_size_p_accept``): after each transition at level j,
its step size is multiplied by 1.05 when the mean acceptance probability exceeded the
target (0.65) and divided by 1.05 otherwise. The step size of a run is fixed before the
run, so the adaptation does not bias the run's weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import FlowforceError

Tensor = torch.Tensor
#: ``x (B, D) -> (log π₀ (B,), log π₁ (B,), ∇log π₀ (B, D), ∇log π₁ (B, D))``
LogDensities = Callable[[Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]

#: Gradient components are clamped to ±MAX_GRAD inside the leapfrog integrator.
MAX_GRAD = 1e4
#: Step-size adaptation factor per transition.
STEP_FACTOR = 1.05
#: Geometric spacing puts its first level at this β.
GEOMETRIC_BETA_MIN = 0.1
SPACINGS = ("geometric", "linear")


def beta_schedule(n_levels: int, spacing: str = "geometric") -> Tensor:
    """Inverse temperatures ``β₀ = 0 < β₁ < … < β_K = 1`` for K = ``n_levels``, float64.

    ``"linear"``: β_j = j/K. ``"geometric"``: β₁ … β_K equally spaced in log β from
    ``GEOMETRIC_BETA_MIN`` to 1 (dense near q, where the flow and the target p²/q differ
    most in a poorly trained flow's tails); for K = 1 both give (0, 1).

    Raises:
        ValueError: n_levels < 1 or an unknown spacing (the message lists the valid ones).
    """
    if n_levels < 1:
        raise FlowforceError(f"AIS needs at least 1 level (n_intermediate ≥ 0), got {n_levels}")
    if spacing == "linear" or n_levels == 1:
        if spacing not in SPACINGS:
            raise FlowforceError(f"unknown AIS spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
        return torch.linspace(0.0, 1.0, n_levels + 1, dtype=torch.float64)
    if spacing != "geometric":
        raise FlowforceError(f"unknown AIS spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    exponents = torch.linspace(math.log(GEOMETRIC_BETA_MIN), 0.0, n_levels, dtype=torch.float64)
    return torch.cat([torch.zeros(1, dtype=torch.float64), exponents.exp()])


@dataclass
class PointState:
    """A batch of points with the cached values of both densities at them."""

    x: Tensor
    log0: Tensor
    log1: Tensor
    grad0: Tensor
    grad1: Tensor

    @classmethod
    def at(cls, x: Tensor, log_densities: LogDensities) -> "PointState":
        return cls(x, *log_densities(x))

    def log_f(self, beta: float) -> Tensor:
        return (1.0 - beta) * self.log0 + beta * self.log1

    def grad_f(self, beta: float) -> Tensor:
        grad = (1.0 - beta) * self.grad0 + beta * self.grad1
        return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0).clamp(-MAX_GRAD, MAX_GRAD)

    def where(self, keep_new: Tensor, new: "PointState") -> "PointState":
        """Per chain: ``new`` where ``keep_new`` (B,) else self."""
        k1, k2 = keep_new[:, None], keep_new
        return PointState(torch.where(k1, new.x, self.x), torch.where(k2, new.log0, self.log0),
                          torch.where(k2, new.log1, self.log1), torch.where(k1, new.grad0, self.grad0),
                          torch.where(k1, new.grad1, self.grad1))


def hmc_step(state: PointState, log_densities: LogDensities, beta: float, step_size: float,
             n_leapfrog: int) -> tuple[PointState, Tensor]:
    """One HMC transition leaving ``f_β ∝ π₀^{1−β} π₁^β`` invariant.

    Args:
        state: current points with cached densities.
        log_densities: the joint log-density callable (one call per leapfrog step).
        beta: inverse temperature of the invariant density.
        step_size: leapfrog step ε.
        n_leapfrog: leapfrog steps L.

    Returns:
        the new state and the acceptance probabilities ``(B,)``.
    """
    p0 = torch.randn_like(state.x)
    p = p0 + 0.5 * step_size * state.grad_f(beta)
    proposal = state
    for i in range(n_leapfrog):
        x = proposal.x + step_size * p
        proposal = PointState.at(x, log_densities)
        p = p + (step_size if i < n_leapfrog - 1 else 0.5 * step_size) * proposal.grad_f(beta)
    log_ratio = (proposal.log_f(beta) - 0.5 * (p * p).sum(-1)) - (state.log_f(beta) - 0.5 * (p0 * p0).sum(-1))
    log_ratio = torch.where(torch.isfinite(log_ratio), log_ratio, torch.full_like(log_ratio, -torch.inf))
    accept_prob = log_ratio.clamp(max=0.0).exp()
    accept = torch.rand_like(accept_prob) < accept_prob
    return state.where(accept, proposal), accept_prob


@dataclass
class AISResult:
    """Final AIS samples ``x (B, D)``, their log weights ``(B,)`` and diagnostics.

    ``log_w_initial`` is ``log π₁ − log π₀`` at the initial samples: the plain importance
    weights of π₀ towards π₁ (AIS with no transitions). ``accept`` holds the mean
    acceptance probability of each level's last transition, ``(K,)``.
    """

    x: Tensor
    log_w: Tensor
    log_w_initial: Tensor
    accept: Tensor
    final: PointState


def annealed_importance_sampling(x0: Tensor, log_densities: LogDensities, betas: Tensor,
                                 step_sizes: Tensor, n_leapfrog: int = 5, n_hmc: int = 1,
                                 adapt: bool = False, target_accept: float = 0.65) -> AISResult:
    """Anneal samples ``x0 ~ π₀`` towards π₁ with HMC; returns samples and log weights.

    Args:
        x0: ``(B, D)`` samples of the normalised π₀ (detached).
        log_densities: joint log densities (see the module docstring).
        betas: ``(K + 1,)`` schedule from :func:`beta_schedule`.
        step_sizes: ``(K,)`` leapfrog step per level; updated in place when ``adapt``.
        n_leapfrog: leapfrog steps per HMC transition.
        n_hmc: HMC transitions per level.
        adapt: adapt ``step_sizes`` towards ``target_accept`` (training only).

    Returns:
        :class:`AISResult`; with ``x₀ ~ π₀``, ``E[exp(log_w)] = Z₁`` (the normaliser of π₁).
    """
    state = PointState.at(x0.detach(), log_densities)
    log_w_initial = state.log1 - state.log0
    log_w = torch.zeros_like(state.log0)
    betas_f = [float(b) for b in betas]
    accept = torch.zeros(len(betas_f) - 1, dtype=torch.float64)
    for j in range(1, len(betas_f)):
        log_w = log_w + (betas_f[j] - betas_f[j - 1]) * (state.log1 - state.log0)
        for _ in range(n_hmc):
            state, prob = hmc_step(state, log_densities, betas_f[j], float(step_sizes[j - 1]), n_leapfrog)
            mean_prob = float(prob.mean())
            if adapt:
                step_sizes[j - 1] *= STEP_FACTOR if mean_prob > target_accept else 1.0 / STEP_FACTOR
        accept[j - 1] = mean_prob if n_hmc > 0 else float("nan")
    return AISResult(state.x, log_w, log_w_initial, accept, state)
