"""Energy Sampling Hamiltonian (ESH) dynamics, pure torch: the integrator and its weights.

Ver Steeg & Galstyan, "Hamiltonian Dynamics with Non-Newtonian Momentum for Rapid
Sampling", NeurIPS 2021, arXiv 2111.02434. For a reduced energy u(x) (kT = 1) on ℝᵈ,

    H(x, v) = u(x) + (d/2)·log(|v|²/d),        ẋ = ∂H/∂v = d·v/|v|²,   v̇ = −∇u(x).

**Scaled time.** Write v = e^r·û with a unit direction û and the log speed r, and change
the clock to dτ = (d/|v|)·dt. Then (g = −∇u, the reduced force)

    dx/dτ = û,        dû/dτ = (I − ûûᵀ)·g/d,        dr/dτ = û·g/d,

so x moves at unit speed in τ and r never feeds back into (x, û): r only keeps the clock.
For a constant g the (û, r) equations are solved in closed form (derived for this module:
the component c = û·ĝ obeys dc/dτ = |g|(1 − c²)/d, so c = tanh(δ + artanh c₀) after a
τ-interval with δ = ε|g|/d, and the orthogonal part shrinks by the matching sech ratio).
Multiplied through by 2e^{−δ}, with ζ = e^{−δ} and ê = g/|g|, it reads

    û' = [2ζ·û + ((1 − ζ²) + c₀(1 − ζ)²)·ê] / D,        D = (1 + c₀) + (1 − c₀)ζ²,
    r' = r + δ + log(D/2),

which only ever exponentiates −δ ≤ 0: no overflow however large the force (the paper's
point about numerical stability). The leapfrog step of length ε (the paper's
ESH-leapfrog) is: half a step of (û, r) with g(x), x ← x + ε·û, half a step with g at the
new x. One gradient per step (the last one is reused by the next step). Along the exact
flow H = u + d·r − (d/2)·log d is constant; the leapfrog conserves it to O(ε²).

**Which weights, and why.** The microcanonical measure of the original-time flow on a
shell H = h is δ(H − h)·d^d v·dx = δ(u(x) + d·r − h')·e^{d·r}·dr·dû·dx; integrating r out
leaves e^{h'−u(x)}·dû·dx/d, so time averages in the *original* time t sample
p(x) ∝ e^{−u(x)} (for any h: the r-marginal has no normaliser to match). The solver steps
in τ, and one τ-step of length ε covers dt = (e^r/d)·ε of original time. So the ergodic
average over the solver's states must weight state k by

    w_k ∝ e^{r_k} = |v_k|,

(unweighted τ-averages sample ∝ e^{−u·(1 − 1/d)}: too hot by d/(d − 1)). Each chain's
weights are normalised over its own states (a chain is one time average), and chains are
pooled with equal total weight.

**Refreshment.** Every ``refresh_every`` steps the direction û is redrawn uniformly on the
sphere of the dimensions the chain moves in; r is kept. This leaves H unchanged and the
microcanonical measure invariant (it is uniform in û given x and r), so the e^r weights
stay valid across refreshes and the pooled average stays one time average. Deterministic
runs (``refresh_every = 0``) may be non-ergodic: a central force conserves angular
momentum, and in one dimension û can never turn (ESH needs d ≥ 2).

**d counts the dimensions û moves in.** For particles with a translation-invariant
energy started with a mean-free û, û stays mean-free and d = (N − 1)·D; using the full
N·D there would give the wrong marginal e^{−u·d'/d}.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import FlowforceError

Tensor = torch.Tensor
#: ``x (B, D) -> (u (B,), g = −∇u (B, D))``: reduced energies and forces.
EnergyAndForce = Callable[[Tensor], tuple[Tensor, Tensor]]

__all__ = ["ESHState", "esh_half_step", "esh_hamiltonian", "esh_leapfrog", "esh_run", "pooled_log_weights",
           "random_direction", "energy_and_force"]

#: |g| below this counts as zero force (the direction ê is then irrelevant: δ = 0).
_TINY_FORCE = 1e-300


def energy_and_force(energy: Callable[[Tensor], Tensor]) -> EnergyAndForce:
    """``x -> (u(x), −∇u(x))`` by autograd, detached, for an energy ``(B, D) -> (B,)``."""

    def evaluate(x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            u = energy(x)
            (grad,) = torch.autograd.grad(u.sum(), x)
        return u.detach(), -grad.detach()

    return evaluate


def random_direction(shape: tuple[int, ...], generator: torch.Generator | None, dtype: torch.dtype,
                     project: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Unit vectors ``(B, D)`` uniform on the sphere (of the subspace ``project`` maps onto)."""
    z = torch.randn(shape, generator=generator, dtype=dtype)
    if project is not None:
        z = project(z)
    return z / z.norm(dim=-1, keepdim=True)


def esh_half_step(u: Tensor, r: Tensor, g: Tensor, eps: float, d: int) -> tuple[Tensor, Tensor]:
    """Exact (û, r) update over a τ-interval ``eps`` under a constant reduced force g.

    Args:
        u: unit directions ``(B, D)``.
        r: log speeds ``(B,)``.
        g: reduced forces −∇u ``(B, D)`` (1/length).
        eps: τ-interval (a length: x moves ``eps`` along û).
        d: dimension of the space û moves in.

    Returns:
        ``(û', r')``, ``û'`` renormalised to unit length (the closed form keeps it there up
        to rounding).
    """
    g_norm = g.norm(dim=-1)
    e = g / g_norm.clamp(min=_TINY_FORCE)[:, None]
    c = (e * u).sum(-1).clamp(-1.0, 1.0)
    delta = eps * g_norm / d
    zeta = torch.exp(-delta)
    denominator = (1.0 + c) + (1.0 - c) * zeta * zeta
    along = (1.0 - zeta * zeta) + c * (1.0 - zeta) ** 2
    u_new = (2.0 * zeta[:, None] * u + along[:, None] * e) / denominator[:, None]
    u_new = u_new / u_new.norm(dim=-1, keepdim=True)
    return u_new, r + delta + torch.log(0.5 * denominator)


@dataclass
class ESHState:
    """A batch of ESH chains: positions ``x (B, D)``, directions ``u (B, D)``, log speeds
    ``r (B,)`` and the cached reduced energy ``energy (B,)`` and force ``force (B, D)`` at x."""

    x: Tensor
    u: Tensor
    r: Tensor
    energy: Tensor
    force: Tensor

    @classmethod
    def start(cls, x: Tensor, u: Tensor, evaluate: EnergyAndForce, r: Tensor | None = None) -> "ESHState":
        energy, force = evaluate(x)
        return cls(x, u, torch.zeros_like(energy) if r is None else r, energy, force)


def esh_leapfrog(state: ESHState, evaluate: EnergyAndForce, eps: float, d: int) -> ESHState:
    """One ESH-leapfrog step of τ-length ``eps``: half (û, r), full x, half (û, r).

    One call of ``evaluate`` (the force at the new x, cached for the next step).
    """
    u, r = esh_half_step(state.u, state.r, state.force, 0.5 * eps, d)
    x = state.x + eps * u
    energy, force = evaluate(x)
    u, r = esh_half_step(u, r, force, 0.5 * eps, d)
    return ESHState(x, u, r, energy, force)


def esh_hamiltonian(state: ESHState, d: int) -> Tensor:
    """H = u(x) + (d/2)·log(|v|²/d) with |v| = e^r, ``(B,)`` (reduced units)."""
    return state.energy + d * state.r - 0.5 * d * math.log(d)


def esh_run(state: ESHState, evaluate: EnergyAndForce, eps: float, d: int, n_steps: int, *,
            refresh_every: int = 0, generator: torch.Generator | None = None,
            project: Callable[[Tensor], Tensor] | None = None, step_offset: int = 0,
            record: Callable[[int, ESHState], None] | None = None) -> ESHState:
    """``n_steps`` leapfrog steps with direction refreshment.

    Before step k (counted from ``step_offset``, so a run split in pieces refreshes at the
    same steps as one run), when ``refresh_every > 0`` and k is a positive multiple of it,
    û is redrawn uniformly (in the range of ``project``); r is kept. ``record(k, state)``
    sees the state after step k.
    """
    for i in range(n_steps):
        k = step_offset + i
        if refresh_every > 0 and k > 0 and k % refresh_every == 0:
            u = random_direction(tuple(state.u.shape), generator, state.u.dtype, project)
            state = ESHState(state.x, u, state.r, state.energy, state.force)
        state = esh_leapfrog(state, evaluate, eps, d)
        if record is not None:
            record(k, state)
    return state


def pooled_log_weights(r: Tensor) -> Tensor:
    """Normalised log weights of recorded states, ``r (T, B)`` → ``(T, B)``.

    State k of chain b gets e^{r_kb} (the original time it stands for, see the module
    docstring), normalised within its chain; the B chains share the total weight equally,
    so ``logsumexp`` over everything is 0.
    """
    if r.dim() != 2 or r.shape[0] == 0:
        raise FlowforceError(f"expected recorded log speeds of shape (T ≥ 1, B), got {tuple(r.shape)}")
    return r - torch.logsumexp(r, dim=0, keepdim=True) - math.log(r.shape[1])
