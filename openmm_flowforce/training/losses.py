"""Losses, named by what they sample from.

All losses are in reduced units (energies ÷ kT, forces ÷ kT). A *density model* has
``log_prob(x) -> (B,)`` and ``sample_and_log_prob(n) -> (x, log q)``; flows on the unit
cube and Boltzmann generators over Cartesian coordinates both qualify.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

import torch

from ..errors import FlowforceError, OptionError
from ..options import NON_NEGATIVE

Tensor = torch.Tensor


class DensityModel(Protocol):
    def log_prob(self, x: Tensor) -> Tensor: ...

    def sample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]: ...


def nll_on_data(model: DensityModel, x: Tensor) -> Tensor:
    """Negative log-likelihood of data: −E_data[log q(x)] (maximum likelihood, forward KL)."""
    return -model.log_prob(x).mean()


def flow_forces(model: DensityModel, x: Tensor, create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """Reduced forces of a density, ∇ₓ log q(x) (multiply by kT for kJ/mol/nm).

    Returns ``(log q (B,), forces shaped like x)``. With ``create_graph`` the forces stay
    differentiable with respect to the model's parameters (double backward).
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        log_q = model.log_prob(x)
        (forces,) = torch.autograd.grad(log_q.sum(), x, create_graph=create_graph)
    return log_q, forces


def force_matching_on_data(model: DensityModel, x: Tensor, reduced_forces: Tensor) -> Tensor:
    """Mean squared error between ∇ₓ log q and reference forces ÷ kT, per coordinate.

    Minimising it makes −kT·log q a potential whose forces match the reference: the
    force-matching principle (Köhler et al., JCTC 2023, arXiv 2203.11167).
    """
    _, forces = flow_forces(model, x, create_graph=True)
    return (forces - reduced_forces).pow(2).flatten(1).mean(1).mean()


def reverse_kl_on_samples(model: DensityModel, reduced_energy: Callable[[Tensor], Tensor], n: int) -> Tensor:
    """E_q[log q(x) + u(x)] on n flow samples: KL(q‖p) up to log Z.

    Sampling uses the root-finding inverse whose gradients come from the inverse
    function theorem, so the loss is differentiable in the flow's parameters.
    """
    x, log_q = model.sample_and_log_prob(n)
    return (log_q + reduced_energy(x)).mean()


LOSS_NAMES = ("nll", "force", "reverse_kl")
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
    total = sum(weights[k] * v for k, v in terms.items())
    return total, {k: float(v.detach()) for k, v in terms.items()}
