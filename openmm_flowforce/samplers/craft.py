"""Continual Repeated Annealed Flow Transport (CRAFT), method ``"craft"``.

Matthews, Arbel, Rezende, Doucet, "Continual Repeated Annealed Flow Transport Monte
Carlo", ICML 2022, arXiv 2201.13117. Sequential Monte Carlo over the geometric path

    π_k ∝ π₀^{1−β_k} · exp(−β_k·u),     0 = β₀ < … < β_K = 1,

π₀ = N(0, s²·I) (:class:`~openmm_flowforce.samplers.transport.GaussianPrior`,
normalised, so Z₀ = 1), with a learnt flow T_k (a
:class:`~openmm_flowforce.samplers.transport.RealCoupling`) per transition. One SMC pass
of n particles (:func:`smc`), for k = 1 … K:

1. transport ``y = T_k(x)`` and reweight by the incremental weight
   ``log G_k = log π_k(T_k(x)) + log|det ∂T_k/∂x| − log π_{k−1}(x)``, with
   ``log Ẑ += log Σ_i W_i G_k,i`` (W the normalised weights);
2. resample (systematic) when the ESS fraction falls below ``ess_threshold``;
3. move with ``n_hmc`` HMC transitions leaving π_k invariant (the HMC of
   :mod:`~openmm_flowforce.samplers.ais`, step sizes adapted towards ``target_accept``
   while training and kept in the model for sampling).

Ẑ is unbiased for Z (E[Ẑ] = Z) whatever the flows; log Ẑ is biased low by about half its
variance. Training (the paper's Algorithm 1) minimises, for every k at once, the KL of the
transported particle approximation of π_{k−1} to π_k,

    L = Σ_k Σ_i W_{k−1,i} · [log π_{k−1}(x_i) − log π_k(T_k(x_i)) − log|det ∂T_k/∂x_i|]
      = −Σ_k Σ_i W_{k−1,i} · log G_k(x_i),

with the particles and weights held fixed (each flow gets the gradient of its own term),
on fresh SMC passes with the current flows. With identity flows (the initialisation) and
``ess_threshold = 0`` the pass is exactly AIS (:func:`~openmm_flowforce.samplers.ais.annealed_importance_sampling`
with the same schedule, step sizes and random numbers); with resampling it is SMC.

Energy evaluations (counted): n at the initial particles, then per level n after the
transport plus n·``n_leapfrog`` per HMC transition.

Logged per step: ``loss``, ``log_z``, ``ess_min`` (smallest ESS fraction after a
reweighting), ``resamples``, ``accept_first``, ``accept_last``, ``step_size``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import FlowforceError
from ..options import COUNT, FRACTION, POSITIVE_INT, Option
from ..reweighting import effective_sample_size
from .ais import STEP_FACTOR, PointState, beta_schedule, hmc_step
from .common import particle_shape
from .flow_training import COMMON_DEFAULTS, FlowSamplerMethod, TrainContext, resolve_options
from .registry import register_method
from .transport import GaussianPrior, RealCoupling, as_sampler_target

Tensor = torch.Tensor


class CRAFTModel(nn.Module):
    """Prior, one flow per transition, the β schedule and the HMC step sizes (buffers).

    Args:
        prior: π₀.
        flows: K transport flows.
        betas: ``(K + 1,)`` schedule.
        step_sizes: ``(K,)`` initial leapfrog steps.
        target: kept as a plain attribute (no state), for :meth:`CRAFTMethod.sample`.
    """

    def __init__(self, prior: GaussianPrior, flows: list[RealCoupling], betas: Tensor, step_sizes: Tensor,
                 target: Any):
        super().__init__()
        if len(flows) != len(betas) - 1 or len(step_sizes) != len(flows):
            raise FlowforceError(f"CRAFT needs one flow and one step size per transition ({len(betas) - 1}), got "
                                 f"{len(flows)} and {len(step_sizes)}")
        self.prior = prior
        self.flows = nn.ModuleList(flows)
        self.register_buffer("betas", betas.to(torch.float64))
        self.register_buffer("step_sizes", step_sizes.to(torch.float64))
        object.__setattr__(self, "target", target)


@dataclass
class SMCResult:
    """One SMC pass: final particles ``x (n, dim)``, their normalised log weights ``(n,)``
    (logsumexp 0), ``log_z`` (float), the CRAFT ``loss`` (a tensor, differentiable in the
    flows when trained), the ESS fraction after each reweighting ``(K,)``, the mean HMC
    acceptance per level ``(K,)`` and the number of resampling events."""

    x: Tensor
    log_w: Tensor
    log_z: float
    loss: Tensor
    ess: Tensor
    accept: Tensor
    resamples: int

    def importance_log_weights(self) -> Tensor:
        """Per-particle log weights whose log-mean-exp is ``log_z`` (and whose ESS is the final one)."""
        return self.log_w + self.log_z + math.log(len(self.log_w))


def systematic_resample(log_w: Tensor) -> Tensor:
    """Indices ``(n,)`` of systematic resampling of normalised ``log_w (n,)`` (one uniform draw)."""
    n = len(log_w)
    cdf = torch.cumsum(torch.softmax(log_w, 0), 0)
    positions = (torch.rand((), dtype=log_w.dtype) + torch.arange(n, dtype=log_w.dtype)) / n
    return torch.searchsorted(cdf, positions).clamp(max=n - 1)


def annealing_log_densities(prior: GaussianPrior, energy: Callable[[Tensor], Tensor]):
    """The joint log densities of :mod:`~openmm_flowforce.samplers.ais` for π₀ = ``prior`` and
    π₁ = exp(−``energy``): ``x -> (log π₀, log π₁, ∇log π₀, ∇log π₁)``, all detached."""

    def log_densities(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            log0, log1 = prior.log_prob(x), -energy(x)
            (grad0,) = torch.autograd.grad(log0.sum(), x, retain_graph=True)
            (grad1,) = torch.autograd.grad(log1.sum(), x)
        return log0.detach(), log1.detach(), grad0, grad1

    return log_densities


def _transport(flow: RealCoupling, state: PointState, prior: GaussianPrior, energy, train: bool):
    """``T(x)``, its ladj and log π₀, log π₁ at T(x) (differentiable in the flow when ``train``),
    and the detached :class:`PointState` at T(x)."""
    with torch.set_grad_enabled(train):
        y, ladj = flow(state.x)
    with torch.enable_grad():
        yg = y if train else y.detach().requires_grad_(True)
        log0, log1 = prior.log_prob(yg), -energy(yg)
        (grad0,) = torch.autograd.grad(log0.sum(), yg, retain_graph=True)
        (grad1,) = torch.autograd.grad(log1.sum(), yg, retain_graph=train)
    new = PointState(y.detach(), log0.detach(), log1.detach(), grad0.detach(), grad1.detach())
    return log0, log1, ladj, new


def smc(model: CRAFTModel, n: int, energy: Callable[[Tensor], Tensor] | None = None, ess_threshold: float = 0.3,
        n_hmc: int = 1, n_leapfrog: int = 5, adapt: bool = False, target_accept: float = 0.65,
        train: bool = False, x0: Tensor | None = None) -> SMCResult:
    """One SMC pass with flow transport (see the module docstring).

    Args:
        model: the CRAFT model (its ``step_sizes`` are adapted in place when ``adapt``).
        n: number of particles.
        energy: reduced target energy (default: the model's target), e.g. a counting wrapper.
        ess_threshold: resample when the ESS fraction is below it (0: never, 1: always).
        n_hmc, n_leapfrog: HMC transitions per level and leapfrog steps per transition.
        adapt: adapt the step sizes towards ``target_accept`` (training).
        train: keep the loss differentiable in the flows.
        x0: ``(n, dim)`` initial particles from π₀ (default: drawn here).

    Returns:
        :class:`SMCResult`.
    """
    energy = energy or model.target.energy
    prior, betas = model.prior, [float(b) for b in model.betas]
    log_densities = annealing_log_densities(prior, energy)
    x0 = prior.sample(n) if x0 is None else x0.detach()
    state = PointState.at(x0, log_densities)
    log_w = torch.full((n,), -math.log(n), dtype=torch.float64)
    log_z, resamples = 0.0, 0
    loss = torch.zeros((), dtype=torch.float64)
    ess = torch.zeros(len(betas) - 1, dtype=torch.float64)
    accept = torch.full((len(betas) - 1,), math.nan, dtype=torch.float64)
    for k in range(1, len(betas)):
        previous = state.log_f(betas[k - 1])
        log0, log1, ladj, state = _transport(model.flows[k - 1], state, prior, energy, train)
        increment = (1.0 - betas[k]) * log0 + betas[k] * log1 + ladj - previous
        increment = torch.where(torch.isnan(increment), torch.full_like(increment, -math.inf), increment)
        weights = log_w.exp()
        finite = torch.isfinite(increment)
        # particles the target gives no mass (u = inf) carry no gradient; their weight is 0
        loss = loss - (weights * torch.where(finite, increment, torch.zeros_like(increment))).sum()
        step = torch.logsumexp(log_w + increment.detach(), 0)
        if not torch.isfinite(step):
            raise FlowforceError(f"every SMC particle has zero weight at level {k} (non-finite energies); "
                                 "try a smaller scale or more levels")
        log_z += float(step)
        log_w = log_w + increment.detach() - step
        ess[k - 1] = effective_sample_size(log_w)
        if float(ess[k - 1]) < ess_threshold:
            idx = systematic_resample(log_w)
            state = PointState(state.x[idx], state.log0[idx], state.log1[idx], state.grad0[idx], state.grad1[idx])
            log_w = torch.full((n,), -math.log(n), dtype=torch.float64)
            resamples += 1
        for _ in range(n_hmc):
            state, prob = hmc_step(state, log_densities, betas[k], float(model.step_sizes[k - 1]), n_leapfrog)
            accept[k - 1] = float(prob.mean())
            if adapt:
                model.step_sizes[k - 1] *= STEP_FACTOR if float(accept[k - 1]) > target_accept else 1 / STEP_FACTOR
    return SMCResult(prior.project(state.x), log_w, log_z, loss, ess, accept, resamples)


class CRAFTMethod(FlowSamplerMethod):
    """``"craft"``: SMC with one trained flow per annealing transition.

    Options beyond the common training ones: ``n_transitions`` (K), ``spacing``
    (``geometric``/``linear`` β), ``n_layers`` (coupling layers per transition flow),
    ``hidden``, ``n_components``, ``transform`` (default ``"spline"``: exactly the identity
    at initialisation), ``scale`` (π₀'s s; None: the target's
    preset), ``ess_threshold``, ``n_hmc``, ``n_leapfrog``, ``step_size`` (None: preset),
    ``target_accept``. A training "step" is one SMC pass of ``batch_size`` particles.
    """

    name = "craft"
    defaults = dict(COMMON_DEFAULTS, n_layers=2, transform="spline", n_transitions=8, spacing="geometric",
                    ess_threshold=0.3, n_hmc=1, n_leapfrog=5, step_size=None, target_accept=0.65)

    def option_schema(self) -> dict[str, Option]:
        schema = super().option_schema()
        schema.update(n_transitions=POSITIVE_INT, n_hmc=COUNT, ess_threshold=Option(float, minimum=0.0, maximum=1.0),
                      target_accept=FRACTION)
        return schema

    def build(self, target: Any, options: Mapping[str, Any]) -> CRAFTModel:
        """Prior, K identity-initialised transport flows, schedule and step sizes for ``target``."""
        target = as_sampler_target(target)
        opts = resolve_options(self.options(options), target)
        shape = particle_shape(target) if opts["mean_free"] else None
        particles = dict(n_particles=shape[0], spatial_dim=shape[1]) if shape else {}
        k = int(opts["n_transitions"])
        prior = GaussianPrior(int(target.dim), float(opts["scale"]), **particles)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(opts["seed"]))
            flows = [RealCoupling(int(target.dim), float(opts["scale"]), **particles, transform=opts["transform"],
                                  n_layers=int(opts["n_layers"]), hidden=opts["hidden"],
                                  n_components=int(opts["n_components"])).double() for _ in range(k)]
        model = CRAFTModel(prior, flows, beta_schedule(k, opts["spacing"]),
                           torch.full((k,), float(opts["step_size"]), dtype=torch.float64), target)
        # the SMC settings a model is sampled with after training (load_sampler rebuilds them)
        model.smc_options = {key: opts[key] for key in ("ess_threshold", "n_hmc", "n_leapfrog", "target_accept")}
        return model

    def _smc(self, model: CRAFTModel, n: int, options: Mapping[str, Any] | None = None, **kwargs: Any) -> SMCResult:
        opts = {**self.defaults, **getattr(model, "smc_options", {}), **(options or {})}
        return smc(model, int(n), ess_threshold=float(opts["ess_threshold"]), n_hmc=int(opts["n_hmc"]),
                   n_leapfrog=int(opts["n_leapfrog"]), target_accept=float(opts["target_accept"]), **kwargs)

    def sample(self, model: CRAFTModel, n: int, options: Mapping[str, Any] | None = None) -> Tensor:
        """``(n, dim)`` unweighted samples: one SMC pass, then a final systematic resampling."""
        result = self._smc(model, n, options)
        return result.x[systematic_resample(result.log_w)]

    def sample_with_log_weights(self, model: CRAFTModel, n: int,
                                options: Mapping[str, Any] | None = None) -> tuple[Tensor, Tensor]:
        """Final particles ``(n, dim)`` and log weights ``(n,)`` whose log-mean-exp is log Ẑ."""
        result = self._smc(model, n, options)
        return result.x, result.importance_log_weights()

    def log_z(self, model: CRAFTModel, n: int, options: Mapping[str, Any] | None = None) -> float:
        """log Ẑ of one SMC pass of n particles."""
        return self._smc(model, n, options).log_z

    def log_z_with_error(self, model: CRAFTModel, n: int, repeats: int = 10,
                         options: Mapping[str, Any] | None = None) -> tuple[float, float]:
        """Mean and standard error of log Ẑ over ``repeats`` independent SMC passes of n particles.

        The mean of log Ẑ is biased low by about half the variance of log Ẑ (Ẑ itself is
        unbiased); the error bar is the spread of the passes, std/√repeats.
        """
        if int(repeats) < 2:
            raise FlowforceError(f"an error bar needs at least 2 repeats, got {repeats!r}")
        values = torch.tensor([self.log_z(model, n, options) for _ in range(int(repeats))], dtype=torch.float64)
        return float(values.mean()), float(values.std() / math.sqrt(len(values)))

    def log_prob(self, model: CRAFTModel, x: Tensor) -> None:
        """CRAFT has no tractable density (its samples are SMC particles)."""
        return None

    def train(self, model, target: Any, options: Mapping[str, Any], checkpoint, progress: bool = True,
              log_path=None) -> dict[str, Any]:
        """:meth:`FlowSamplerMethod.train` on the target (an OpenMM energy is seen as flat positions)."""
        return super().train(model, as_sampler_target(target), options, checkpoint, progress, log_path)

    def train_step(self, ctx: TrainContext) -> dict[str, float]:
        result = self._smc(ctx.model, int(ctx.options["batch_size"]), ctx.options, energy=ctx.energy, adapt=True,
                           train=True)
        updated = ctx.optimizer_step(result.loss)
        return {"loss": float(result.loss.detach()), "log_z": result.log_z, "ess_min": float(result.ess.min()),
                "resamples": float(result.resamples), "accept_first": float(result.accept[0]),
                "accept_last": float(result.accept[-1]), "step_size": float(ctx.model.step_sizes.mean()),
                "skipped": float(not updated)}


register_method(CRAFTMethod.name, CRAFTMethod)
