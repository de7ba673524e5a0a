"""What every sampler method's checkpoint holds, so one CLI can load any of them.

A sampler checkpoint is a dict written with :func:`openmm_flowforce.io.save_checkpoint`
(atomic) and read with ``weights_only=True``:

=================  ==================================================================
key                value
=================  ==================================================================
``format``         :data:`SAMPLER_CHECKPOINT_FORMAT`
``method``         registry name of the method (``"idem"``, ``"fab"``, ...)
``target``         ``{"name": registry name or None, "kwargs": {...}}``
``options``        the method's resolved options (plain Python values)
``model``          ``model.state_dict()`` of the module ``method.build(target, options)``
``summary``        ``{"steps", "energy_evaluations", "wall_time_s", ...}`` so far
``state``          method-specific resume state (optimizer, buffers, RNG, ...)
=================  ==================================================================

:func:`load_sampler` rebuilds the model from the first five keys through the method
registry. A target built with :func:`make_target` remembers its registry name, which
:func:`target_spec` puts in the checkpoint; a target built otherwise is stored with name
None and must be passed to :func:`load_sampler` explicitly.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import torch

from ..io import load_checkpoint
from ..targets.registry import get_target
from .registry import SamplerMethod, get_method
from ..errors import FlowforceError

#: Format tag of sampler checkpoints (see the module docstring for the keys).
SAMPLER_CHECKPOINT_FORMAT = "openmm-flowforce/sampler-checkpoint/1"

_NAME_ATTRIBUTE = "_flowforce_target_name"
_KWARGS_ATTRIBUTE = "_flowforce_target_kwargs"


def make_target(name: str, **kwargs: Any) -> Any:
    """``get_target(name, **kwargs)`` that remembers its name for sampler checkpoints."""
    target = get_target(name, **kwargs)
    setattr(target, _NAME_ATTRIBUTE, name)
    setattr(target, _KWARGS_ATTRIBUTE, dict(kwargs))
    return target


def target_spec(target: Any) -> dict[str, Any]:
    """``{"name", "kwargs"}`` of a target built by :func:`make_target` (name None otherwise)."""
    return {"name": getattr(target, _NAME_ATTRIBUTE, None), "kwargs": dict(getattr(target, _KWARGS_ATTRIBUTE, {}))}


def particle_shape(target: Any) -> tuple[int, int] | None:
    """``(n_particles, spatial_dim)`` of a particle target, None for a plain vector target."""
    n, d = getattr(target, "n_particles", None), getattr(target, "spatial_dim", None)
    return (int(n), int(d)) if n is not None and d is not None else None


class LoadedSampler(NamedTuple):
    """A sampler rebuilt from its checkpoint."""

    method: SamplerMethod
    target: Any
    options: dict[str, Any]
    model: torch.nn.Module
    checkpoint: dict[str, Any]


def load_sampler(path: str | os.PathLike, target: Any = None,
                 evaluation_options: Mapping[str, Any] | None = None) -> LoadedSampler:
    """Rebuild method, target and model from a sampler checkpoint (``weights_only`` load).

    ``evaluation_options`` replace the checkpoint's options that do not change the trained
    model (e.g. iDEM's ``ode_steps``); the method rejects keys it does not have.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a sampler checkpoint, unknown method or target (listing the
            valid names), or a checkpoint that names no target and none was passed.
    """
    ckpt = load_checkpoint(path, expected_format=SAMPLER_CHECKPOINT_FORMAT)
    method = get_method(ckpt["method"])
    if target is None:
        spec = ckpt.get("target") or {}
        if spec.get("name") is None:
            raise FlowforceError(f"{path} does not name its target (it was trained on a target not built with "
                                 "make_target); pass target= explicitly")
        target = make_target(spec["name"], **spec.get("kwargs", {}))
    options = dict(ckpt["options"])
    if evaluation_options:
        options = method.options({**options, **evaluation_options}, where=str(path))
    model = method.build(target, options)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return LoadedSampler(method, target, options, model, ckpt)


#: Options that may differ between a checkpoint and the run resuming it.
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "log_every", "ode_steps", "divergence", "n_probes")


def sampler_fingerprint(target: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """What a sampler is trained from: the target (name and keyword arguments) and the
    resolved options but :data:`RESUMABLE_CHANGES` (see :func:`~openmm_flowforce.engine.fingerprint`)."""
    from ..engine import fingerprint

    spec = target_spec(target)
    return fingerprint(json.dumps(spec, sort_keys=True, default=str),
                       {k: v for k, v in options.items() if k not in RESUMABLE_CHANGES})


def check_method(name: str) -> Callable[[dict[str, Any]], None]:
    """A check for :class:`~openmm_flowforce.engine.Engine` that a checkpoint is of method ``name``."""

    def check(ckpt: dict[str, Any]) -> None:
        if ckpt.get("method") != name:
            raise FlowforceError(f"cannot resume: the checkpoint is a {ckpt.get('method')!r} sampler, not {name!r}; "
                                 "give another --out or start over with --restart")

    return check


def default_log_path(checkpoint: str | os.PathLike) -> Path:
    """``S.ckpt`` → ``S.jsonl``: where a sampler's metrics log goes unless told otherwise."""
    return Path(checkpoint).with_suffix(".jsonl")


#: Registry of the modules that register sampler methods, imported by
#: :func:`import_methods` (a method module registers itself on import). A module that is
#: not there yet is skipped, so methods written later plug in by adding a line here.
METHOD_MODULES: tuple[str, ...] = (
    "openmm_flowforce.samplers.idem",
    "openmm_flowforce.samplers.fab",
    "openmm_flowforce.samplers.reverse_kl",
    "openmm_flowforce.samplers.snf",
    "openmm_flowforce.samplers.craft",
    "openmm_flowforce.samplers.esh_method",
)


def import_methods() -> dict[str, str]:
    """Import every module of :data:`METHOD_MODULES`; returns ``{module: why skipped}``.

    A module that does not exist is skipped silently; one that fails to import is
    skipped with a ``RuntimeWarning`` naming the error, so one broken method does not
    take the others down.
    """
    import importlib
    import warnings

    skipped: dict[str, str] = {}
    for module in METHOD_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                warnings.warn(f"sampler module {module} could not be imported: {error}", RuntimeWarning,
                              stacklevel=2)
            skipped[module] = str(error)
        except Exception as error:  # a method under construction must not break the others
            warnings.warn(f"sampler module {module} could not be imported: {type(error).__name__}: {error}",
                          RuntimeWarning, stacklevel=2)
            skipped[module] = f"{type(error).__name__}: {error}"
    return skipped
