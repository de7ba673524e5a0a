"""Stochastic normalizing flows (SNF), method ``"snf"``.

Wu, Köhler, Noé, "Stochastic Normalizing Flows", NeurIPS 2020, arXiv 2002.06707. A
sample is a path

    x₀ ~ q₀ (a :class:`~openmm_flowforce.flows.RealFlow`)  →  [stochastic layer k at U_λk
    (→ deterministic layer k)]  for k = 1 … K,

with the stochastic layers of :mod:`~openmm_flowforce.samplers.stochastic` (overdamped or
underdamped Langevin, Metropolis–Hastings; option ``layer``) and, when ``n_between`` > 0,
a :class:`~openmm_flowforce.samplers.transport.RealCoupling` of ``n_between`` coupling
layers after each. The intermediate energies interpolate prior → target,
U_λ = (1 − λ)·u₀ + λ·u with λ_k from :func:`~openmm_flowforce.samplers.ais.beta_schedule`
(``spacing``; λ_K = 1), u₀ = −log q₀ (``path="flow"``) or the Gaussian N(0, s²) energy
(``path="gaussian"``). The path weight is

    log w = −u(x_K) − log q̂(x_K),     log q̂ = log q₀(x₀) − Σ_k log|det J_k| − Σ_k ΔS_k,

E[w] = Z exactly; with K = 0 it is the plain flow's weight. Trained by KL in either
direction (``objective``):

* ``"reverse"`` (energy based): minimise E_path[log q̂ + u(x_K)] = KL(path‖backward path)
  − log Z ≥ KL(q_K‖p) − log Z, by the reparameterisation gradient through every layer
  (Langevin drifts differentiated twice through the target when ``force_gradients``);
* ``"forward"`` (needs ``data``, an ``.npy`` of target samples ``(m, dim)``): minimise the
  path NLL −E_data E_B[log q̂(x)], an upper bound of the NLL, the backward path run from
  the data through the inverse layers;
* ``"both"``: their sum.

``energy_cut`` regularises the reverse-KL energy as in ``reverse-kl``
(:func:`~openmm_flowforce.samplers.reverse_kl.regularised_energy`); logged weights use
the true energy. Energy evaluations (counted): one per point per Langevin step and at
every point a layer starts from; the path NLL evaluates the energy along backward paths.

Logged per step: ``loss``, ``ess`` and ``log_z`` of the batch's path weights,
``step_size`` (mean over layers) and ``accept`` (MH only).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import BadFileError, FlowforceError
from ..flows import RealFlow
from ..io import bad_file, require_input_file
from ..options import COUNT, Option
from ..reweighting import effective_sample_size
from .ais import beta_schedule
from .common import particle_shape
from .flow_training import COMMON_DEFAULTS, FlowSamplerMethod, TrainContext, resolve_options
from .registry import register_method
from .reverse_kl import regularised_energy
from .stochastic import STOCHASTIC_LAYERS, StochasticLayer, make_evaluator, make_layer
from .transport import GaussianPrior, RealCoupling, as_sampler_target

Tensor = torch.Tensor
PATHS = ("flow", "gaussian")
OBJECTIVES = ("reverse", "forward", "both")


class StochasticNormalizingFlow(nn.Module):
    """A flow q₀ followed by K stochastic (and optionally deterministic) blocks.

    Args:
        flow: the flow q₀ (float64).
        prior: the Gaussian whose energy is u₀ when ``path == "gaussian"``; also holds the
            hyperplane projection of particle systems.
        layers: K stochastic layers (their λ set).
        couplings: K deterministic layers, or an empty list.
        path: ``"flow"`` or ``"gaussian"`` (what u₀ is).
        target: the target (``energy(x) (B,)``, reduced), kept as a plain attribute (no
            state) so :meth:`sample` works on a model loaded from a checkpoint.
    """

    def __init__(self, flow: RealFlow, prior: GaussianPrior, layers: list[StochasticLayer],
                 couplings: list[RealCoupling], path: str, target: Any):
        super().__init__()
        if path not in PATHS:
            raise FlowforceError(f"unknown SNF path {path!r}; valid: {', '.join(PATHS)}")
        if couplings and len(couplings) != len(layers):
            raise FlowforceError("give one deterministic layer per stochastic layer, or none")
        self.flow, self.prior, self.path = flow, prior, path
        self.layers = nn.ModuleList(layers)
        self.couplings = nn.ModuleList(couplings)
        object.__setattr__(self, "target", target)  # not a submodule: no state, not moved

    def _evaluator(self, energy: Callable[[Tensor], Tensor] | None, create_graph: bool):
        u0 = self.prior.energy if self.path == "gaussian" else (lambda x: -self.flow.log_prob(x))
        return make_evaluator(u0, energy or self.target.energy, self.prior, create_graph)

    def forward_path(self, n: int, energy: Callable[[Tensor], Tensor] | None = None,
                     create_graph: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Run n paths from q₀.

        Args:
            n: number of paths.
            energy: reduced target energy (default: the target's), e.g. a counting wrapper.
            create_graph: differentiate the Langevin drifts (double backward; training).

        Returns:
            ``x_K (n, dim)``, ``log q̂ (n,)`` and ``u(x_K) (n,)``; ``log w = −u − log q̂``.
            Everything stays differentiable in the parameters unless under ``no_grad``.
        """
        energy = energy or self.target.energy
        x, log_q = self.flow.sample_and_log_prob(int(n))
        if not self.layers:
            return x, log_q, energy(x)
        evaluate = self._evaluator(energy, create_graph)
        point = evaluate(x)
        for k, layer in enumerate(self.layers):
            point, delta = layer(point, evaluate, self.prior)
            log_q = log_q - delta
            if self.couplings:
                y, ladj = self.couplings[k](point.x)
                log_q = log_q - ladj
                point = evaluate(y)
        return point.x, log_q, point.u1

    forward = forward_path  # so torch.func.functional_call and hooks see the sampling path

    def path_log_prob(self, x: Tensor, energy: Callable[[Tensor], Tensor] | None = None,
                      create_graph: bool = False) -> Tensor:
        """The path estimate log q̂(x) ``(B,)`` on one backward path from ``x (B, dim)``.

        E_B[log q̂(x)] ≤ log q_K(x) (Jensen), so −mean log q̂ over data is an upper bound
        of the model's NLL; with K = 0 it is log q₀(x) exactly.
        """
        x = self.prior.project(x)
        if not self.layers:
            return self.flow.log_prob(x)
        evaluate = self._evaluator(energy, create_graph)
        log_q = torch.zeros(x.shape[0], dtype=x.dtype)
        point = None if self.couplings else evaluate(x)
        for k in reversed(range(len(self.layers))):
            if self.couplings:
                x, ladj_inv = self.couplings[k].inverse(x)
                log_q = log_q + ladj_inv
                point = evaluate(x)
            # the layer is its own backward kernel: running it samples B, its −ΔS is the forward ΔS
            point, delta = self.layers[k](point, evaluate, self.prior)
            log_q = log_q + delta
            x = point.x
        return log_q + self.flow.log_prob(x)


def _load_data(path: str, target: Any) -> Tensor:
    what, fix = f"a .npy array of target samples (m, {target.dim})", "save one with numpy.save"
    path = require_input_file(path, what, fix)
    try:
        data = np.load(path, allow_pickle=False)  # no pickled objects: they could run code
    except Exception as error:  # numpy raises several types for truncated or foreign files
        raise bad_file(path, what, error, fix) from None
    if not isinstance(data, np.ndarray) or not np.issubdtype(data.dtype, np.number):
        raise BadFileError(f"data {path} is not a numeric .npy array; expected {what}")
    data = data.reshape(len(data), -1) if data.ndim > 1 else data
    if data.ndim != 2 or data.shape[1] != target.dim or len(data) < 1 or not np.isfinite(data).all():
        raise BadFileError(f"data {path} has shape {data.shape} or non-finite values; expected {what}")
    return torch.as_tensor(data, dtype=torch.float64)


def _differentiable_twice(target: Any) -> bool:
    """OpenMM energies refuse double backward (their forces are not differentiable)."""
    from ..targets.openmm_energy import OpenMMEnergy

    return not isinstance(getattr(target, "target", target), OpenMMEnergy)


class SNFMethod(FlowSamplerMethod):
    """``"snf"``: a RealFlow followed by stochastic layers, trained by path KL.

    Options beyond the common flow/training ones (see the module docstring):
    ``n_blocks`` (K stochastic layers, 0 = the plain flow), ``block_steps`` (moves per
    layer), ``layer`` (``overdamped``, ``underdamped``, ``mh``), ``step_size`` (None: the
    target's preset h; overdamped ε = h²/2, underdamped ε = h, MH σ = h), ``learn_step``,
    ``friction`` (underdamped γ), ``spacing`` (λ schedule), ``path`` (u₀), ``n_between``
    (coupling layers per deterministic layer, 0 = none), ``objective``, ``data``,
    ``energy_cut``, ``force_gradients`` (None: True unless the target is OpenMM).
    """

    name = "snf"
    defaults = dict(COMMON_DEFAULTS, n_blocks=4, block_steps=2, layer="overdamped", step_size=None,
                    learn_step=True, friction=1.0, spacing="linear", path="flow", n_between=0,
                    objective="reverse", data=None, energy_cut=None, force_gradients=None)

    def option_schema(self) -> dict[str, Option]:
        schema = super().option_schema()
        schema.update(n_blocks=COUNT, block_steps=COUNT, n_between=COUNT,
                      layer=Option(str, choices=tuple(STOCHASTIC_LAYERS)), path=Option(str, choices=PATHS),
                      objective=Option(str, choices=OBJECTIVES), friction=Option(float, minimum=0.0),
                      data=Option(str, nullable=True), force_gradients=Option(bool, nullable=True))
        return schema

    def build(self, target: Any, options: Mapping[str, Any]) -> StochasticNormalizingFlow:
        """The SNF for ``target``: the RealFlow of :class:`FlowSamplerMethod` plus its layers."""
        target = as_sampler_target(target)
        opts = resolve_options(self.options(options), target)
        flow = super().build(target, options)
        shape = particle_shape(target) if opts["mean_free"] else None
        particles = dict(n_particles=shape[0], spatial_dim=shape[1]) if shape else {}
        prior = GaussianPrior(int(target.dim), float(opts["scale"]), **particles)
        k = int(opts["n_blocks"])
        h = float(opts["step_size"])
        step = {"overdamped": 0.5 * h * h, "underdamped": h, "mh": h}[opts["layer"]]
        lams = [float(b) for b in beta_schedule(k, opts["spacing"])[1:]] if k else []
        layers = [make_layer(opts["layer"], lam, int(opts["block_steps"]), step, bool(opts["learn_step"]),
                             float(opts["friction"])) for lam in lams]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(opts["seed"]) + 1)
            couplings = [RealCoupling(int(target.dim), float(opts["scale"]), **particles,
                                      transform=opts["transform"], n_layers=int(opts["n_between"]),
                                      hidden=opts["hidden"], n_components=int(opts["n_components"])).double()
                         for _ in lams] if int(opts["n_between"]) > 0 else []
        return StochasticNormalizingFlow(flow, prior, layers, couplings, opts["path"], target)

    # -- sampling ----------------------------------------------------------------------
    def sample(self, model: StochasticNormalizingFlow, n: int) -> Tensor:
        """``(n, dim)`` end points of SNF paths."""
        with torch.no_grad():
            return model.forward_path(int(n))[0]

    def sample_with_log_weights(self, model: StochasticNormalizingFlow, n: int) -> tuple[Tensor, Tensor]:
        """End points ``(n, dim)`` and path log weights ``(n,)`` (log-mean-exp estimates log Z)."""
        with torch.no_grad():
            x, log_q, u = model.forward_path(int(n))
        return x, -u - log_q

    def log_prob(self, model: StochasticNormalizingFlow, x: Tensor) -> Tensor:
        """The path estimate of log q (one backward path each; a lower bound in expectation)."""
        with torch.no_grad():
            return model.path_log_prob(x.to(torch.float64)).detach()

    # -- training ----------------------------------------------------------------------
    def init_extra(self, model, target, options: Mapping[str, Any]) -> dict[str, Any]:
        if options["objective"] != "reverse" and options["data"] is None:
            raise FlowforceError(f"objective {options['objective']!r} needs data: set the option data to an .npy "
                                 "of target samples, or use objective: reverse")
        force_gradients = options["force_gradients"]
        return {"data": _load_data(str(options["data"]), target) if options["data"] is not None else None,
                "create_graph": _differentiable_twice(target) if force_gradients is None else bool(force_gradients)}

    def train(self, model, target: Any, options: Mapping[str, Any], checkpoint, progress: bool = True,
              log_path=None) -> dict[str, Any]:
        """:meth:`FlowSamplerMethod.train` on the target (an OpenMM energy is seen as flat positions)."""
        return super().train(model, as_sampler_target(target), options, checkpoint, progress, log_path)

    def train_step(self, ctx: TrainContext) -> dict[str, float]:
        model: StochasticNormalizingFlow = ctx.model
        opts, batch = ctx.options, int(ctx.options["batch_size"])
        loss = torch.zeros((), dtype=torch.float64)
        metrics: dict[str, float] = {}
        if opts["objective"] in ("reverse", "both"):
            x, log_q, u = model.forward_path(batch, ctx.energy, create_graph=ctx.extra["create_graph"])
            loss = loss + (log_q + regularised_energy(u, opts.get("energy_cut"))).mean()
            log_w = (-u - log_q).detach()
            log_w = torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf))
            finite = bool(torch.isfinite(log_w).any())
            metrics["ess"] = effective_sample_size(log_w) if finite else 0.0
            metrics["log_z"] = float(torch.logsumexp(log_w, 0) - math.log(batch)) if finite else -math.inf
        if opts["objective"] in ("forward", "both"):
            data = ctx.extra["data"]
            x = data[torch.randint(len(data), (batch,))]
            nll = -model.path_log_prob(x, ctx.energy, create_graph=ctx.extra["create_graph"]).mean()
            loss = loss + nll
            metrics["path_nll"] = float(nll.detach())
        updated = ctx.optimizer_step(loss)
        if model.layers:
            metrics["step_size"] = float(torch.stack([layer.log_step.detach().exp() for layer in model.layers]).mean())
            if opts["layer"] == "mh":
                metrics["accept"] = float(np.mean([layer.last_accept for layer in model.layers]))
        return {"loss": float(loss.detach()), **metrics, "skipped": float(not updated)}


register_method(SNFMethod.name, SNFMethod)
