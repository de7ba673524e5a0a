"""The one bijection contract, its one composition and its one inverse.

Every bijection maps a batch and returns ``(output, ladj)`` from one fused call, where
``ladj`` is ``log|det d output / d input|`` of the map applied, with shape ``[batch]``
(the first dimension of the input). Elementwise transforms act on ``(B, D)`` tensors and
sum their log-derivatives over ``D``.

Bijections hold already-computed parameter tensors and no weights: ``nn.Module`` s own
the weights and build bijections from them (see :mod:`openmm_flowforce.flows`).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import FlowforceError

Tensor = torch.Tensor


class Bijection:
    """Base class: ``forward(x) -> (y, ladj)`` and ``inverse(y) -> (x, ladj)``."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.forward(x)


class Compose(Bijection):
    """``Compose(f1, f2, ...)`` applies f1 first, then f2, ...; log-determinants add."""

    def __init__(self, *bijections: Bijection):
        self.bijections: tuple[Bijection, ...] = tuple(bijections)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        ladj = x.new_zeros(x.shape[0])
        for b in self.bijections:
            x, l = b.forward(x)
            ladj = ladj + l
        return x, ladj

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        ladj = y.new_zeros(y.shape[0])
        for b in reversed(self.bijections):
            y, l = b.inverse(y)
            ladj = ladj + l
        return y, ladj


class Inverse(Bijection):
    """The inverse of a bijection: forward and inverse swapped."""

    def __init__(self, bijection: Bijection):
        self.bijection = bijection

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.bijection.inverse(x)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.bijection.forward(y)


class CircularShift(Bijection):
    """Rotation of the circle [0, 1): ``y = (x + shift) mod 1``; volume preserving.

    Args:
        shift: tensor broadcastable to the input ``(B, D)``.
    """

    def __init__(self, shift: Tensor):
        self.shift = shift

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return torch.remainder(x + self.shift, 1.0), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return torch.remainder(y - self.shift, 1.0), y.new_zeros(y.shape[0])


class ElementwiseFamily:
    """A family of elementwise monotone transforms of [0, 1] (or of the circle).

    A family turns unconstrained parameters ``raw`` of shape ``(B, D, n_params)``, as
    produced by a conditioner, into a :class:`Bijection` acting on ``(B, D)``. This is how
    coupling layers compose with transforms: they take a family, not a subclass.
    """

    #: registry name
    name: str = ""

    def n_params(self, n_components: int, periodic: bool) -> int:
        raise NotImplementedError

    def build(self, raw: Tensor, periodic: bool) -> Bijection:
        raise NotImplementedError

    def identity_raw(self, n_components: int, periodic: bool) -> Tensor:
        """Unconstrained parameters (n_params,) for which the transform is (close to) identity."""
        raise NotImplementedError


_FAMILIES: dict[str, ElementwiseFamily] = {}


def register_family(family: ElementwiseFamily) -> ElementwiseFamily:
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> ElementwiseFamily:
    """Look up an elementwise transform family by name ("smooth", "spline")."""
    try:
        return _FAMILIES[name]
    except KeyError:
        valid = ", ".join(sorted(_FAMILIES))
        raise FlowforceError(f"unknown transform {name!r}; valid names: {valid}") from None


def family_names() -> Sequence[str]:
    return tuple(sorted(_FAMILIES))
