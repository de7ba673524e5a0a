"""Named targets: ``get_target("openmm", system=..., temperature=...)``.

A target is anything that maps positions ``(B, N, 3)`` to reduced energies ``(B,)``; a
factory builds one from keyword arguments. Factories import their heavy dependencies
themselves, so importing the registry costs nothing.
"""
from __future__ import annotations

from typing import Any, Callable

TargetFactory = Callable[..., Any]

_TARGETS: dict[str, TargetFactory] = {}


def register_target(name: str, factory: TargetFactory, *, overwrite: bool = False) -> TargetFactory:
    """Register ``factory`` under ``name`` and return it.

    Raises:
        ValueError: if the name is empty or taken (unless ``overwrite``).
        TypeError: if the factory is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a target name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"the factory for target {name!r} must be callable, got {type(factory).__name__}")
    if name in _TARGETS and not overwrite:
        raise ValueError(f"target {name!r} is already registered; pass overwrite=True to replace it")
    _TARGETS[name] = factory
    return factory


def target_names() -> tuple[str, ...]:
    """The registered target names, sorted."""
    return tuple(sorted(_TARGETS))


def get_target(name: str, **kwargs: Any) -> Any:
    """Build the target registered as ``name`` from keyword arguments.

    Raises:
        ValueError: for an unknown name; the message lists the valid names.
    """
    try:
        factory = _TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r}; valid names: {', '.join(target_names())}") from None
    return factory(**kwargs)


def _openmm_energy(**kwargs: Any) -> Any:
    """``OpenMMEnergy(system=..., temperature=..., platform=..., n_workers=..., ...)``."""
    from .openmm_energy import OpenMMEnergy

    return OpenMMEnergy(**kwargs)


register_target("openmm", _openmm_energy)
