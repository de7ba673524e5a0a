"""Named targets: ``get_target("openmm", system=..., temperature=...)``.

A target is anything that maps positions ``(B, N, 3)`` to reduced energies ``(B,)``; a
factory builds one from keyword arguments. Factories import their heavy dependencies
themselves, so importing the registry costs nothing.
"""
from __future__ import annotations

from typing import Any, Callable

from ..errors import FlowforceError

TargetFactory = Callable[..., Any]

_TARGETS: dict[str, TargetFactory] = {}


def register_target(name: str, factory: TargetFactory, *, overwrite: bool = False) -> TargetFactory:
    """Register ``factory`` under ``name`` and return it.

    Raises:
        ValueError: if the name is empty or taken (unless ``overwrite``).
        TypeError: if the factory is not callable.
    """
    if not isinstance(name, str) or not name:
        raise FlowforceError(f"a target name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"the factory for target {name!r} must be callable, got {type(factory).__name__}")
    if name in _TARGETS and not overwrite:
        raise FlowforceError(f"target {name!r} is already registered; pass overwrite=True to replace it")
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
        raise FlowforceError(f"unknown target {name!r}; valid names: {', '.join(target_names())}") from None
    return factory(**kwargs)


def _openmm_energy(**kwargs: Any) -> Any:
    """``OpenMMEnergy(system=..., temperature=..., platform=..., n_workers=..., ...)``."""
    from .openmm_energy import OpenMMEnergy

    return OpenMMEnergy(**kwargs)


register_target("openmm", _openmm_energy)


def _gmm40(**kwargs: Any) -> Any:
    """``GaussianMixture40(seed=0, ...)``: 40 2-D Gaussians, normalised (log Z = 0)."""
    from .toys import GaussianMixture40

    return GaussianMixture40(**kwargs)


def _dw4(**kwargs: Any) -> Any:
    """``MultiDoubleWell(n_particles=4, spatial_dim=2)``: DW-4, flat x (B, 8)."""
    from .toys import MultiDoubleWell

    return MultiDoubleWell(**{"n_particles": 4, "spatial_dim": 2, **kwargs})


def _lj(n_particles: int):
    def factory(**kwargs: Any) -> Any:
        from .toys import LennardJonesCluster

        if "n_particles" in kwargs:
            raise FlowforceError(f"target 'lj{n_particles}' fixes n_particles={n_particles}; "
                                 "build LennardJonesCluster(n_particles=...) directly for other sizes")
        return LennardJonesCluster(n_particles=n_particles, **{"spatial_dim": 3, **kwargs})

    factory.__doc__ = f"``LennardJonesCluster(n_particles={n_particles}, spatial_dim=3)``: LJ-{n_particles}."
    return factory


register_target("gmm40", _gmm40)
register_target("dw4", _dw4)
register_target("lj13", _lj(13))
register_target("lj55", _lj(55))


def _molecule(name: str, solvent: str):
    def factory(**kwargs: Any) -> Any:
        from .molecules import builtin_molecule_target

        return builtin_molecule_target(name, solvent)(**kwargs)

    factory.__doc__ = f"``MoleculeTarget``: the built-in {name} in {solvent} (amber14-all), flat x (B, 3N) nm."
    return factory


register_target("alanine-dipeptide", _molecule("alanine-dipeptide", "vacuum"))
register_target("alanine-dipeptide-implicit", _molecule("alanine-dipeptide", "implicit"))
