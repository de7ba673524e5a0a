"""Flow Annealed importance sampling Bootstrap (FAB), method ``"fab"``.

Midgley, Stimper, Simm, Schölkopf, Hernández-Lobato, "Flow Annealed Importance Sampling
Bootstrap", ICLR 2023, arXiv 2208.01893. The flow q_θ (a smooth
:class:`~openmm_flowforce.flows.RealFlow`; on molecule targets such as alanine dipeptide
the Boltzmann generator on internal coordinates,
:class:`~openmm_flowforce.samplers.molecule_flow.MoleculeFlow`, with HMC on its
standardised internal coordinates, as fab-torch runs its alanine-dipeptide AIS, or on the
Cartesian ones) is trained to minimise the mass-covering
α-divergence with α = 2,

    D_2(p‖q_θ) ∝ ∫ p(x)²/q_θ(x) dx,        ∇_θ D_2 ∝ −∫ (p²/q_θ)·∇_θ log q_θ dx,

(the paper's Sec. 3). The integrand of the gradient is estimated by annealed importance
sampling (AIS) whose initial distribution is the flow and whose *target is g = p²/q_θ*,
the distribution that minimises the variance of that estimator (Sec. 3.1): the
annealing path is log f_β = (1 − β) log q_θ + β (2 log p − log q_θ), with HMC transitions
and step sizes adapted towards an acceptance rate of 0.65
(:mod:`~openmm_flowforce.samplers.ais`). With x_i, w_i the AIS samples and weights, held
fixed (no gradient through AIS), the surrogate loss is

    S(θ) = −Σ_i w̄_i log q_θ(x_i),          w̄_i = w_i / Σ_j w_j,

whose gradient is the self-normalised AIS estimate of ∇_θ D_2 up to a positive factor
(used when ``buffer`` is False).

With the prioritised replay buffer (``buffer`` True, the paper's Sec. 3.3 and
Algorithm 2, the default as in their experiments): each iteration runs AIS once and
stores ``(x, log w, log q_θ(x))``; then ``n_updates`` minibatches are drawn from the
buffer with probability ∝ w (:class:`~openmm_flowforce.samplers.buffer.PrioritisedBuffer`)
and each gives the loss

    L(θ) = −(1/B) Σ_i [q_θ'(x_i)/q_θ(x_i)]·log q_θ(x_i),

θ' the parameters at which x_i's weight was last valid and the ratio held fixed (it turns
samples of p²/q_θ' into samples of p²/q_θ in expectation), clipped at ``w_adjust_clip``
(fab-torch ``w_adjust_max_clip``). The drawn points' weights are then re-expressed for
the parameters θ at which log q_θ was just evaluated (before this update, as fab-torch
does by default), ``log w ← log w + log q_θ' − log q_θ``, and θ' ← θ.
Before the first update the buffer is filled with AIS samples of the initial flow up to
``min_buffer`` points.

The equation numbers of the paper are not quoted here because we could not check them
against the published text; the formulas above are the ones implemented.

Energy evaluations, all counted: per AIS batch of B chains, B at the initial flow
samples plus B·``n_leapfrog`` per HMC transition (K = ``n_intermediate`` + 1 levels,
``n_hmc`` transitions each), each with its gradient. The buffer updates only evaluate
the flow.

Logged per step: ``loss``; ``ess_flow`` (Kish ESS fraction of the flow's own importance
weights p/q on the AIS starting batch, free since the AIS evaluates p there);
``ess_ais`` (of the AIS weights for p²/q); ``log_z_flow`` (log-mean-exp of log p − log q);
mean HMC acceptance at the first and last level and the mean step size.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ..reweighting import effective_sample_size
from .ais import AISResult, annealed_importance_sampling, beta_schedule
from .buffer import PrioritisedBuffer
from .flow_training import COMMON_DEFAULTS, FlowSamplerMethod, TrainContext
from .registry import register_method
from ..errors import FlowforceError

Tensor = torch.Tensor


def fab_log_densities(model, energy):
    """Joint log densities for AIS from q towards p²/q: ``x -> (log q, 2 log p − log q, ∇…, ∇…)``.

    ``log p = −u`` (unnormalised). For particle flows the gradients are those of
    translation-invariant functions, so HMC moves stay in the zero-centre-of-mass frame
    up to a free drift of the centre of mass, which is removed afterwards.
    """

    def log_densities(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            log_q = model.log_prob(x)
            (grad_q,) = torch.autograd.grad(log_q.sum(), x)
            log_p = -energy(x)
            (grad_p,) = torch.autograd.grad(log_p.sum(), x)
        log_q, log_p = log_q.detach(), log_p.detach()
        return log_q, 2.0 * log_p - log_q, grad_q, 2.0 * grad_p - grad_q

    return log_densities


def fab_internal_log_densities(model, energy):
    """:func:`fab_log_densities` on the standardised internal coordinates z of a
    :class:`~openmm_flowforce.samplers.molecule_flow.MoleculeFlow` (``ais_space: internal``).

    Both densities of z carry the Jacobian J = |det dx/dz| of the configuration x(z):
    ``log q(z) = log q(x) + log J`` (evaluated directly on z) and ``log p(z) = −u(x) + log J``,
    so ``2 log p − log q`` and the AIS weights are those of the Cartesian run; only the HMC
    moves differ. Points outside the physical range (:meth:`MoleculeFlow.from_standard`)
    get log densities −∞ (HMC rejects them) and zero gradients.
    """

    def log_densities(z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            log_q = model.log_prob_standard(z)
            (grad_q,) = torch.autograd.grad(log_q.sum(), z)
            x, log_jac, valid = model.from_standard(z)
            log_p = log_jac - energy(x)
            (grad_p,) = torch.autograd.grad(log_p.sum(), z)
        outside = torch.full_like(log_q, -math.inf)
        log_q, log_p = log_q.detach(), log_p.detach()
        keep = valid[:, None]
        return (torch.where(valid, log_q, outside), torch.where(valid, 2.0 * log_p - log_q, outside),
                torch.where(keep, grad_q, 0.0), torch.where(keep, 2.0 * grad_p - grad_q, 0.0))

    return log_densities


def _ess(log_w: Tensor) -> float:
    log_w = torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf))
    return effective_sample_size(log_w) if bool(torch.isfinite(log_w).any()) else 0.0


class FABMethod(FlowSamplerMethod):
    """``"fab"``: FAB with HMC-AIS towards p²/q and a prioritised replay buffer.

    Options beyond the common flow/training ones (None: the target's preset):
    ``n_intermediate`` (AIS levels between q and p²/q; K = n_intermediate + 1 levels with
    transitions), ``spacing`` (``"geometric"`` or ``"linear"`` β schedule), ``n_leapfrog``,
    ``n_hmc`` (HMC transitions per level), ``step_size`` (initial leapfrog step),
    ``target_accept``, ``buffer`` (prioritised replay on/off), ``buffer_size``,
    ``min_buffer``, ``n_updates`` (gradient steps per AIS batch with the buffer),
    ``w_adjust_clip``, ``ais_space`` (where HMC moves: ``"cartesian"``, or ``"internal"``,
    the standardised internal coordinates of ``flow: internal`` and its default; see
    :func:`fab_internal_log_densities`). A "step" is one AIS batch (plus its ``n_updates`` updates).
    """

    name = "fab"
    defaults = dict(COMMON_DEFAULTS, n_intermediate=2, spacing="geometric", n_leapfrog=5, n_hmc=1,
                    step_size=None, target_accept=0.65, buffer=True, buffer_size=4096, min_buffer=1024,
                    n_updates=4, w_adjust_clip=10.0, ais_space=None)

    # -- state -------------------------------------------------------------------------
    def init_extra(self, model, target, options: Mapping[str, Any]) -> dict[str, Any]:
        for key, low in (("n_intermediate", 0), ("n_hmc", 1)):
            value = options[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise FlowforceError(f"option {key} must be an integer ≥ {low}, got {value!r}")
        n_levels = int(options["n_intermediate"]) + 1
        extra: dict[str, Any] = {
            "betas": beta_schedule(n_levels, options["spacing"]),
            "step_sizes": torch.full((n_levels,), float(options["step_size"]), dtype=torch.float64),
            "buffer": None,
        }
        if options["buffer"]:
            if int(options["min_buffer"]) < int(options["batch_size"]):
                raise FlowforceError(f"min_buffer ({options['min_buffer']}) must be at least batch_size "
                                     f"({options['batch_size']})")
            if int(options["buffer_size"]) < int(options["min_buffer"]):
                raise FlowforceError(f"buffer_size ({options['buffer_size']}) must be at least min_buffer "
                                     f"({options['min_buffer']})")
            extra["buffer"] = PrioritisedBuffer(model.dim, int(options["buffer_size"]))
        return extra

    def extra_state(self, extra: dict[str, Any]) -> dict[str, Any]:
        return {"step_sizes": extra["step_sizes"].clone(),
                "buffer": extra["buffer"].state_dict() if extra["buffer"] is not None else None}

    def load_extra(self, extra: dict[str, Any], state: dict[str, Any]) -> None:
        if state["step_sizes"].shape != extra["step_sizes"].shape:
            raise FlowforceError("the checkpoint has a different number of AIS levels (n_intermediate changed)")
        extra["step_sizes"].copy_(state["step_sizes"])
        if extra["buffer"] is not None:
            if state["buffer"] is None:
                raise FlowforceError("the checkpoint was trained without a buffer; keep buffer=False to resume it")
            extra["buffer"].load_state_dict(state["buffer"])

    # -- AIS ---------------------------------------------------------------------------
    def run_ais(self, ctx: TrainContext, n: int, adapt: bool = True) -> tuple[AISResult, Tensor]:
        """AIS from the flow towards p²/q for ``n`` chains, in the option ``ais_space``.

        Returns:
            the AIS result with ``x`` replaced by the final configurations (detached, mean
            free, Cartesian), and log q(x) there ``(n,)`` (cached by AIS; for the internal
            space, log q(z) less the Jacobian).
        """
        model, opts, extra = ctx.model, ctx.options, ctx.extra
        internal = opts.get("ais_space", "cartesian") == "internal"
        with torch.no_grad():
            x0 = model.sample(n)
            start = model.to_standard(x0) if internal else x0
        log_densities = (fab_internal_log_densities if internal else fab_log_densities)(model, ctx.energy)
        result = annealed_importance_sampling(
            start, log_densities, extra["betas"], extra["step_sizes"],
            n_leapfrog=int(opts["n_leapfrog"]), n_hmc=int(opts["n_hmc"]), adapt=adapt,
            target_accept=float(opts["target_accept"]))
        log_q = result.final.log0
        if internal:
            with torch.no_grad():
                x, log_jac, _ = model.from_standard(result.x)
            result.x, log_q = x, log_q - log_jac
        result.x = model.project(result.x).detach()
        return result, log_q.detach()

    def _diagnostics(self, result, extra) -> dict[str, float]:
        log_w_flow = 0.5 * result.log_w_initial  # log p − log q at the flow samples
        finite = log_w_flow[torch.isfinite(log_w_flow)]
        log_z = float(torch.logsumexp(finite, 0) - math.log(len(log_w_flow))) if len(finite) else -math.inf
        return {"ess_flow": _ess(log_w_flow), "ess_ais": _ess(result.log_w), "log_z_flow": log_z,
                "accept_first": float(result.accept[0]), "accept_last": float(result.accept[-1]),
                "step_size": float(extra["step_sizes"].mean())}

    # -- one step ----------------------------------------------------------------------
    def train_step(self, ctx: TrainContext) -> dict[str, float]:
        opts, extra, model = ctx.options, ctx.extra, ctx.model
        batch = int(opts["batch_size"])
        buffer: PrioritisedBuffer | None = extra["buffer"]
        if buffer is None:
            result, _ = self.run_ais(ctx, batch)
            weights = torch.softmax(torch.nan_to_num(result.log_w, nan=-math.inf), 0).detach()
            loss = -(weights * model.log_prob(result.x)).sum()
            skipped = float(not ctx.optimizer_step(loss))
            return {"loss": float(loss.detach()), **self._diagnostics(result, extra), "skipped": skipped}

        while len(buffer) < int(opts["min_buffer"]):  # Algorithm 2: fill with the initial flow's AIS samples
            result, log_q_final = self.run_ais(ctx, batch)
            buffer.add(result.x, result.log_w, log_q_final)
        result, log_q_final = self.run_ais(ctx, batch)
        # log q at the final AIS samples (cached by AIS; projection leaves it unchanged).
        buffer.add(result.x, result.log_w, log_q_final)
        losses, skipped = [], 0
        for _ in range(int(opts["n_updates"])):
            idx, x, log_q_old = buffer.sample(batch)
            log_q = model.log_prob(x)
            w_adjust = torch.exp(log_q_old - log_q.detach()).clamp(max=float(opts["w_adjust_clip"]))
            loss = -(w_adjust * log_q).mean()
            skipped += int(not ctx.optimizer_step(loss))
            buffer.reweight(idx, log_q.detach())
            losses.append(float(loss.detach()))
        return {"loss": sum(losses) / len(losses), **self._diagnostics(result, extra),
                "buffer_size": float(len(buffer)), "skipped": float(skipped)}


register_method(FABMethod.name, FABMethod)
