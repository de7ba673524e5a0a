"""ESH dynamics as a sampler method, ``"esh"``: chains run through the training engine.

ESH (Ver Steeg & Galstyan, NeurIPS 2021, arXiv 2111.02434; maths and weights in
:mod:`openmm_flowforce.samplers.esh`) has nothing to train. "Training" runs ``n_chains``
chains for ``steps`` leapfrog steps (one engine step each), records every ``thin``-th
state after ``burn_in`` steps with its log speed r, and keeps everything in the model's
buffers, so the engine's atomic checkpoints, exact resume and Ctrl-C handling apply
unchanged: a run stopped and resumed records the same states as an uninterrupted one.
:meth:`ESHMethod.sample` resamples the recorded states with their pooled weights e^r
(multinomial); :meth:`ESHModel.weighted_samples` gives the states and log weights for
exact weighted averages.

Targets: any of ``targets/registry.py``. Flat targets (``dim``, positions ``(B, dim)``)
start from ``init_scale``·N(0, I); particle targets are kept mean free (``mean_free``,
then d = (N − 1)·D, see the kernel module). Targets taking ``(B, N, 3)`` positions (the
OpenMM bridge, kT set by its temperature) are run on flattened coordinates and must be
started from real positions with :meth:`ESHModel.start_from` before ``train``.

Energy evaluations counted: one energy-and-gradient per chain per step, plus one per
chain at the start (and at a resume, where the cached force is recomputed).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..engine import Engine, StateOf
from ..errors import FlowforceError
from ..options import COUNT, POSITIVE, POSITIVE_INT, Option
from ..reweighting import effective_sample_size
from .common import SAMPLER_CHECKPOINT_FORMAT, check_method, particle_shape, sampler_fingerprint, target_spec
from .esh import ESHState, energy_and_force, esh_hamiltonian, esh_leapfrog, pooled_log_weights, random_direction
from .registry import SamplerMethod, register_method

Tensor = torch.Tensor

#: Per-target values of options left at None: ``step_size`` (τ-length of a step, in the
#: target's length unit) and ``init_scale`` (std of the starting Gaussian; GMM-40's means
#: are uniform in [−40, 40]²). Chosen from the short scans in bench/bench_esh.py.
_PRESETS: dict[str, dict[str, float]] = {
    "gmm40": dict(step_size=1.0, init_scale=25.0),
    "dw4": dict(step_size=0.25, init_scale=2.0),
    "lj13": dict(step_size=0.05, init_scale=1.0),
    "lj55": dict(step_size=0.02, init_scale=1.5),
    "default": dict(step_size=0.01, init_scale=1.0),
}

#: Rules of the options this method has beyond the shared ones.
_OWN_OPTIONS: dict[str, Option] = {"n_chains": POSITIVE_INT, "thin": POSITIVE_INT, "burn_in": COUNT,
                                   "refresh_every": COUNT, "init_scale": POSITIVE}


def _target_key(target: Any) -> str:
    from .flow_training import target_key

    return target_key(target)


def flat_energy(target: Any) -> tuple[int, Callable[[Tensor], Tensor]]:
    """``(dim, energy)`` with ``energy: (B, dim) -> (B,)`` reduced, for any registry target."""
    if hasattr(target, "dim"):
        return int(target.dim), target.energy if hasattr(target, "energy") else target
    n = getattr(target, "n_particles", None)
    if n is None:
        raise FlowforceError(f"ESH needs a target with flat positions (attribute dim) or an OpenMM-style target "
                             f"(attribute n_particles); got {type(target).__name__}")
    return 3 * int(n), lambda x: target(x.reshape(x.shape[0], int(n), 3))


class ESHModel(torch.nn.Module):
    """Chain state and recorded states of an ESH run (buffers only; no parameters).

    Buffers: ``x``, ``u`` ``(B, D)``; ``r`` ``(B,)``; ``started`` (0/1);
    ``samples`` ``(T, B, D)`` and ``log_speeds`` ``(T, B)``, of which the first
    ``n_recorded`` rows are filled. Loading a state dict takes its shapes (the record grows
    when a resumed run is given more steps).
    """

    def __init__(self, dim: int, n_chains: int, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.dim = int(dim)
        for name, shape in (("x", (n_chains, dim)), ("u", (n_chains, dim)), ("r", (n_chains,)),
                            ("samples", (0, n_chains, dim)), ("log_speeds", (0, n_chains))):
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))
        self.register_buffer("started", torch.zeros((), dtype=torch.int64))
        self.register_buffer("n_recorded", torch.zeros((), dtype=torch.int64))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Buffers take the saved tensors with their shapes (the record's length varies)."""
        missing = set(self._buffers) - set(state_dict)
        unexpected = set(state_dict) - set(self._buffers)
        if strict and (missing or unexpected):
            raise RuntimeError(f"ESHModel state dict: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        for name in self._buffers:
            if name in state_dict:
                self._buffers[name] = state_dict[name].detach().clone()
        return None

    def start_from(self, x: Tensor) -> None:
        """Start every chain at ``x`` ``(D,)``, ``(B, D)`` or ``(B, N, 3)`` (for OpenMM targets, nm)."""
        x = torch.as_tensor(x, dtype=self.x.dtype).reshape(-1, self.dim)
        if x.shape[0] not in (1, self.x.shape[0]):
            raise FlowforceError(f"start_from got {x.shape[0]} configurations for {self.x.shape[0]} chains; "
                                 "pass one or one per chain")
        self.x = x.expand_as(self.x).clone()
        self.started.fill_(0)  # the directions are drawn by train()
        self._explicit_start = True

    def weighted_samples(self) -> tuple[Tensor, Tensor]:
        """Recorded states ``(M, D)`` and their normalised log weights ``(M,)`` (logsumexp 0)."""
        n = int(self.n_recorded)
        if n == 0:
            raise FlowforceError("this ESH run has recorded no samples yet (steps ≤ burn_in?); run it longer")
        log_w = pooled_log_weights(self.log_speeds[:n])
        return self.samples[:n].reshape(-1, self.dim), log_w.reshape(-1)


class ESHMethod(SamplerMethod):
    """``"esh"``: ESH-leapfrog chains with e^r-weighted ergodic averages.

    Options (None: the target's preset): ``steps`` (leapfrog steps per chain),
    ``n_chains``, ``step_size`` (τ-length ε), ``refresh_every`` (redraw û every so many
    steps, 0: never), ``burn_in`` (steps not recorded), ``thin`` (record every so many
    steps), ``init_scale``, ``mean_free``, ``seed``, ``checkpoint_every``, ``log_every``.
    """

    name = "esh"
    defaults: Mapping[str, Any] = dict(steps=2000, n_chains=64, step_size=None, refresh_every=50, burn_in=200,
                                       thin=5, init_scale=None, mean_free=True, seed=0, checkpoint_every=500,
                                       log_every=50)

    def option_schema(self) -> dict[str, Option]:
        schema = super().option_schema()
        for key, rule in _OWN_OPTIONS.items():
            schema[key] = dataclasses.replace(rule, nullable=self.defaults[key] is None)
        return schema

    def resolve(self, target: Any, options: Mapping[str, Any] | None) -> dict[str, Any]:
        opts = self.options(options)
        preset = _PRESETS[_target_key(target)]
        return {k: (preset[k] if v is None and k in preset else v) for k, v in opts.items()}

    def build(self, target: Any, options: Mapping[str, Any]) -> ESHModel:
        opts = self.resolve(target, options)
        dim, _ = flat_energy(target)
        return ESHModel(dim, int(opts["n_chains"]))

    def train(self, model: ESHModel, target: Any, options: Mapping[str, Any], checkpoint: str | Path | None,
              progress: bool = True, log_path: str | Path | None = None) -> dict[str, Any]:
        """Run (or resume) the chains to ``steps``; returns ``{"steps", "energy_evaluations",
        "wall_time_s", "resumed_from", "ess", "max_energy_drift"}``: ``ess`` is the Kish ESS
        fraction of the pooled weights, ``max_energy_drift`` the largest |H − H(end of
        burn-in)| of any chain (reduced units), the integration error that moves the weights."""
        return _Run(self, model, target, self.resolve(target, options), checkpoint, progress, log_path).run()

    def sample(self, model: ESHModel, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``(n, dim)`` states resampled with probability ∝ their pooled weight."""
        x, log_w = model.weighted_samples()
        idx = torch.multinomial(log_w.exp(), int(n), replacement=True, generator=generator)
        return x[idx]


class _Run:
    """One ESH run: its state and step; the loop is the engine's."""

    def __init__(self, method: ESHMethod, model: ESHModel, target: Any, opts: dict[str, Any],
                 checkpoint: str | Path | None, progress: bool, log_path: str | Path | None):
        self.model, self.target, self.opts = model, target, opts
        dim, energy = flat_energy(target)
        shape = particle_shape(target)
        self.project = None
        self.d = dim
        if shape is not None and opts["mean_free"]:
            n, k = shape
            self.project = lambda v: (v.reshape(v.shape[0], n, k) - v.reshape(v.shape[0], n, k).mean(1, keepdim=True)
                                      ).reshape(v.shape)
            self.d = (n - 1) * k
        self.evaluate = energy_and_force(self._counted(energy))
        self.generator = torch.Generator().manual_seed(int(opts["seed"]))
        self.energy_evaluations = 0
        self.h0: Tensor | None = None
        self.max_drift = 0.0
        self.state: ESHState | None = None
        self.engine = Engine(
            model, self.step, int(opts["steps"]), checkpoint=checkpoint, checkpoint_every=int(opts["checkpoint_every"]),
            fmt=SAMPLER_CHECKPOINT_FORMAT,
            payload=lambda: {"format": SAMPLER_CHECKPOINT_FORMAT, "method": method.name, "target": target_spec(target),
                             "options": dict(opts), "summary": self.summary()},
            fingerprint=sampler_fingerprint(target, opts), check=check_method(method.name),
            state={"esh": StateOf(self._state, self._load_state)}, generators={"esh": self.generator},
            log_path=log_path, log_every=int(opts["log_every"]),
            log_extra=lambda: {"energy_evaluations": self.energy_evaluations, "ess": self.ess(),
                               "max_energy_drift": self.max_drift},
            progress="esh" if progress else None, seed=int(opts["seed"]))

    def _counted(self, energy: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        def counted(x: Tensor) -> Tensor:
            self.energy_evaluations += x.shape[0]
            return energy(x)

        return counted

    # -- checkpoints --------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        return {"steps": self.engine.step, "energy_evaluations": self.energy_evaluations,
                "wall_time_s": self.engine.elapsed(), "ess": self.ess(), "max_energy_drift": self.max_drift}

    def _state(self) -> dict[str, Any]:
        return {"energy_evaluations": self.energy_evaluations, "max_drift": self.max_drift,
                "h0": self.h0.clone() if self.h0 is not None else None}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.energy_evaluations, self.max_drift = int(state["energy_evaluations"]), float(state["max_drift"])
        self.h0 = state["h0"]

    def ess(self) -> float:
        """Kish ESS fraction of the pooled weights of the states recorded so far (nan: none)."""
        n = int(self.model.n_recorded)
        return effective_sample_size(pooled_log_weights(self.model.log_speeds[:n]).reshape(-1)) if n else math.nan

    # -- the chain ----------------------------------------------------------------------------
    def _start(self) -> None:
        model, opts = self.model, self.opts
        if not bool(model.started):
            if not getattr(model, "_explicit_start", False):
                if not hasattr(self.target, "dim"):
                    raise FlowforceError("an OpenMM target needs starting positions: call model.start_from(x) "
                                         "(nm) before train")
                model.x = float(opts["init_scale"]) * torch.randn(model.x.shape, generator=self.generator,
                                                                  dtype=model.x.dtype)
            if self.project is not None:
                model.x = self.project(model.x)
            model.u = random_direction(tuple(model.u.shape), self.generator, model.u.dtype, self.project)
            model.r = torch.zeros_like(model.r)
            model.started.fill_(1)
        self.state = ESHState.start(model.x, model.u, self.evaluate, model.r)
        if self.h0 is None and int(self.opts["burn_in"]) == 0:
            self.h0 = esh_hamiltonian(self.state, self.d)

    def _grow_record(self) -> None:
        opts, model = self.opts, self.model
        needed = max(0, (int(opts["steps"]) - int(opts["burn_in"])) // int(opts["thin"]))
        if model.samples.shape[0] < needed:
            extra = needed - model.samples.shape[0]
            model.samples = torch.cat([model.samples, model.samples.new_zeros((extra,) + model.samples.shape[1:])])
            model.log_speeds = torch.cat([model.log_speeds, model.log_speeds.new_zeros((extra,) + model.r.shape)])

    def step(self) -> dict[str, float]:
        opts, model, k = self.opts, self.model, self.engine.step
        assert self.state is not None
        state = self.state
        refresh = int(opts["refresh_every"])
        if refresh > 0 and k > 0 and k % refresh == 0:  # the same rule as esh_run
            u = random_direction(tuple(state.u.shape), self.generator, state.u.dtype, self.project)
            state = ESHState(state.x, u, state.r, state.energy, state.force)
        state = esh_leapfrog(state, self.evaluate, float(opts["step_size"]), self.d)
        if self.project is not None:  # rounding only: û and the force are mean free already
            state = ESHState(self.project(state.x), state.u, state.r, state.energy, state.force)
        self.state = state
        model.x, model.u, model.r = state.x, state.u, state.r
        if k + 1 > int(opts["burn_in"]) and (k + 1 - int(opts["burn_in"])) % int(opts["thin"]) == 0:
            i = int(model.n_recorded)
            model.samples[i], model.log_speeds[i] = state.x, state.r
            model.n_recorded += 1
        if self.h0 is None:
            if k + 1 < int(opts["burn_in"]):
                return {"energy": float(state.energy.mean())}
            self.h0 = esh_hamiltonian(state, self.d)  # drift counts from the end of burn-in, where weights start
        drift = (esh_hamiltonian(state, self.d) - self.h0).abs()
        drift = float(drift[torch.isfinite(drift)].max()) if bool(torch.isfinite(drift).any()) else math.inf
        self.max_drift = max(self.max_drift, drift)
        return {"energy": float(state.energy.mean()), "energy_drift": drift}

    def run(self) -> dict[str, Any]:
        self.engine.resume()
        self._grow_record()
        self._start()
        self.engine.run()
        return {**self.summary(), "resumed_from": self.engine.resumed_from}


register_method(ESHMethod.name, ESHMethod)
