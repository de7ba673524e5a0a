"""Registry of energy-only sampling methods (iDEM, FAB, reverse KL).

Every method implements :class:`SamplerMethod`; the CLI (``flowforce sampler``) and the
benchmarks only talk to this interface, so methods are compared on the same targets,
checkpoints and metrics.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..errors import FlowforceError
from ..options import COUNT, NON_NEGATIVE, POSITIVE, POSITIVE_INT, SEED, Option, check_options

Tensor = torch.Tensor


#: Type and range of the options that methods share by name (``flowforce sampler train
#: --config`` ``options:`` keys, ``--steps``, ``--seed``).
SAMPLER_OPTIONS: dict[str, Option] = {
    **{key: POSITIVE_INT for key in ("steps", "batch_size", "batch", "buffer_size", "n_mc", "n_init", "n_generate",
                                     "integration_steps", "steps_per_outer", "n_layers", "hidden", "n_components",
                                     "checkpoint_every", "log_every", "n_leapfrog", "n_hmc", "n_updates",
                                     "egnn_layers", "n_importance", "ode_steps", "n_probes")},
    **{key: POSITIVE for key in ("lr", "sigma_min", "sigma_max", "max_score_norm", "diffusion_scale", "data_scale",
                                 "scale", "step_size", "w_adjust_clip", "aug_scale")},
    "n_intermediate": COUNT, "min_buffer": COUNT, "grad_clip": NON_NEGATIVE, "seed": SEED,
    "target_accept": Option(float, minimum=0.0, maximum=1.0, open_minimum=True, open_maximum=True),
    "energy_cut": Option(float), "network": Option(str, choices=("egnn", "mlp")),
    "weighting": Option(str, choices=("none", "variance")), "spacing": Option(str, choices=("geometric", "linear")),
    "transform": Option(str), "mean_free": Option(bool), "buffer": Option(bool),
    "flow": Option(str, choices=("real", "equivariant", "internal")),
    "ais_space": Option(str, choices=("cartesian", "internal")),
    "divergence": Option(str, choices=("exact", "hutchinson")),
    "ema": Option(float, minimum=0.0, maximum=1.0, open_maximum=True),
}


class SamplerMethod:
    """One sampling method.

    A method builds a model for a target, trains it from the target's energy alone
    (checkpointing atomically, resuming exactly, counting target energy evaluations),
    draws samples and, when it has one, evaluates the model's log density.
    """

    #: registry name, e.g. "idem"
    name: str = ""
    #: default options; ``options`` passed by users are validated against these keys
    defaults: Mapping[str, Any] = {}

    def option_schema(self) -> dict[str, Option]:
        """The :class:`~openmm_flowforce.options.Option` of every option: the shared rule of
        :data:`SAMPLER_OPTIONS` for its name, else the type of its default; an option whose
        default is None ("the method decides") may be given as null."""
        schema = {}
        for key, default in self.defaults.items():
            rule = SAMPLER_OPTIONS.get(key) or (Option(object) if default is None else Option(type(default)))
            schema[key] = dataclasses.replace(rule, nullable=default is None)
        return schema

    def options(self, given: Mapping[str, Any] | None, where: str = "") -> dict[str, Any]:
        """Defaults overlaid with ``given``, checked against :meth:`option_schema`.

        Raises:
            OptionError: an unknown key (listing the valid ones) or a bad value.
        """
        return {**self.defaults, **check_options(dict(given or {}), self.option_schema(), where,
                                                 section="options")}

    def build(self, target, options: Mapping[str, Any]) -> torch.nn.Module:
        raise NotImplementedError

    def train(self, model: torch.nn.Module, target, options: Mapping[str, Any], checkpoint: str | Path,
              progress: bool = True, log_path: str | Path | None = None) -> dict[str, Any]:
        """Train and return a summary with at least ``steps``, ``energy_evaluations``, ``wall_time_s``."""
        raise NotImplementedError

    def sample(self, model: torch.nn.Module, n: int) -> Tensor:
        """``(n, target.dim)`` samples."""
        raise NotImplementedError

    def log_prob(self, model: torch.nn.Module, x: Tensor) -> Tensor | None:
        """Normalised log density of the samples, or None for methods without one."""
        return None

    #: Methods whose density is cheapest along their own sampling path (iDEM's
    #: probability-flow ODE) also define ``sample_with_log_prob(model, n) -> (x, log_q)``;
    #: the sampler report then takes the ESS from those samples.
    #: Methods whose samples carry their own importance weights (SNF path weights, SMC
    #: weights) also define ``sample_with_log_weights(model, n) -> (x (n, dim), log_w (n,))``,
    #: log w with respect to exp(−u) whose log-mean-exp estimates log Z; the sampler
    #: report then takes the ESS from those weights.


_METHODS: dict[str, Callable[[], SamplerMethod]] = {}


def register_method(name: str, factory: Callable[[], SamplerMethod]) -> None:
    if name in _METHODS:
        raise FlowforceError(f"sampler method {name!r} is already registered")
    _METHODS[name] = factory


def method_names() -> tuple[str, ...]:
    return tuple(sorted(_METHODS))


def get_method(name: str) -> SamplerMethod:
    """The sampler method called ``name``; unknown names list the valid ones."""
    try:
        return _METHODS[name]()
    except KeyError:
        raise FlowforceError(f"unknown sampler method {name!r}; valid names: {', '.join(method_names())}") from None
