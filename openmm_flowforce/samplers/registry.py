"""Registry of energy-only sampling methods (iDEM, FAB, reverse KL).

Every method implements :class:`SamplerMethod`; the CLI (``flowforce sampler``) and the
benchmarks only talk to this interface, so methods are compared on the same targets,
checkpoints and metrics.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..errors import FlowforceError

Tensor = torch.Tensor


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

    def options(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """Defaults overlaid with ``given``; unknown keys are rejected, naming the valid ones."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            raise FlowforceError(f"unknown option(s) for {self.name}: {', '.join(unknown)}; "
                                 f"valid: {', '.join(sorted(self.defaults))}")
        return {**self.defaults, **given}

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
