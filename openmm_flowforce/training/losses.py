"""Weighted sums of the named losses for the trainer.

The losses themselves (``nll_on_data``, ``force_matching_on_data``, ``reverse_kl_on_samples``,
``flow_forces``) are defined in :mod:`openmm_flowforce.flows.losses`, below ``samplers``,
which use them too; here they are combined by weight (:func:`weighted_loss`).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ..errors import FlowforceError, OptionError
from ..flows import CouplingFlow
from ..flows.losses import (DensityModel, bi_lipschitz_on_data, flow_forces, force_matching_on_data, nll_on_data,
                            reverse_kl_on_samples)
from ..options import NON_NEGATIVE

__all__ = ["LOSS_NAMES", "LOSS_WEIGHT", "DensityModel", "flow_forces", "force_matching_on_data", "nll_on_data",
           "parse_loss_weights", "reverse_kl_on_samples", "weighted_loss"]

Tensor = torch.Tensor


LOSS_NAMES = ("nll", "force", "reverse_kl", "bi_lipschitz")
#: Points of each batch the ``bi_lipschitz`` term is evaluated on (it inverts the flow: costly).
BI_LIPSCHITZ_POINTS = 32
#: A loss weight: a finite number ≥ 0 (0 switches the term off).
LOSS_WEIGHT = NON_NEGATIVE


def _number_or_text(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text  # the check below names it


def parse_loss_weights(spec: str | Mapping[str, float], where: str = "") -> dict[str, float]:
    """``"nll=1,force=0.1"`` or a mapping → validated weights (finite, ≥ 0).

    Raises:
        OptionError: unknown loss names (listing the valid ones), weights that are not
            numbers ≥ 0, or no non-zero weight.
    """
    if isinstance(spec, str):
        items: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            if not sep:
                raise OptionError(f"loss term {part!r} needs a weight, e.g. 'nll=1,force=0.1'")
            items[name.strip()] = _number_or_text(value.strip())
    elif isinstance(spec, Mapping):
        items = {str(k): v for k, v in spec.items()}
    else:
        raise OptionError(f"{where + ': ' if where else ''}loss must be a mapping or 'nll=1,force=0.1', got {spec!r}")
    for name, value in items.items():
        items[name] = LOSS_WEIGHT.check(f"weight of loss {name!r}", value, where)
    unknown = sorted(set(items) - set(LOSS_NAMES))
    if unknown:
        raise OptionError(f"unknown loss term(s) {', '.join(unknown)}; valid names: {', '.join(LOSS_NAMES)}")
    if not items or all(w == 0 for w in items.values()):
        raise OptionError("at least one loss term needs a non-zero weight, e.g. 'nll=1'")
    return {k: v for k, v in items.items() if v != 0}


def weighted_loss(model: DensityModel, weights: Mapping[str, float], x: Tensor | None = None,
                  reduced_forces: Tensor | None = None,
                  reduced_energy: Callable[[Tensor], Tensor] | None = None,
                  n_samples: int = 0) -> tuple[Tensor, dict[str, float]]:
    """Σ weight·term over the named terms; returns the total and each term's value."""
    terms: dict[str, Tensor] = {}
    if "nll" in weights:
        terms["nll"] = nll_on_data(model, x)
    if "force" in weights:
        if reduced_forces is None:
            raise FlowforceError("the 'force' loss needs reference forces in the data set")
        terms["force"] = force_matching_on_data(model, x, reduced_forces)
    if "reverse_kl" in weights:
        if reduced_energy is None:
            raise FlowforceError("the 'reverse_kl' loss needs an energy target")
        terms["reverse_kl"] = reverse_kl_on_samples(model, reduced_energy, n_samples or len(x))
    if "bi_lipschitz" in weights:
        terms["bi_lipschitz"] = bi_lipschitz_on_data(*_flow_and_cube_points(model, x[:BI_LIPSCHITZ_POINTS]))
    total = sum(weights[k] * v for k, v in terms.items())
    return total, {k: float(v.detach()) for k, v in terms.items()}


def _flow_and_cube_points(model: DensityModel, x: Tensor) -> tuple[CouplingFlow, Tensor]:
    """The coupling flow of ``model`` and the batch in its unit-cube coordinates.

    A Boltzmann generator maps positions to the cube by its internal coordinates; a
    coupling flow takes cube points as they are.
    """
    flow = getattr(model, "flow", model)
    if not isinstance(flow, CouplingFlow):
        raise FlowforceError(f"the 'bi_lipschitz' loss needs a coupling flow or a Boltzmann generator, "
                             f"not a {type(model).__name__}")
    coordinates = getattr(model, "coordinates", None)
    if coordinates is not None:
        with torch.no_grad():
            x = coordinates.to_unit(x, check=False)[0]
    return flow, x
