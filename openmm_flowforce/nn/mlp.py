"""Multilayer perceptron used as conditioner and as energy network."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import FlowforceError

_ACTIVATIONS = {"silu": nn.SiLU, "tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


class MLP(nn.Sequential):
    """``in_features → hidden... → out_features`` with a smooth activation between layers.

    Args:
        in_features: input width.
        out_features: output width.
        hidden: widths of the hidden layers.
        activation: one of "silu", "tanh", "relu", "gelu". Smooth flows want a smooth
            activation (silu, tanh, gelu): ReLU makes forces discontinuous.
        zero_last: initialise the last layer to zero, so the output starts at its bias.
    """

    def __init__(self, in_features: int, out_features: int, hidden: Sequence[int] = (64, 64),
                 activation: str = "silu", zero_last: bool = False):
        if activation not in _ACTIVATIONS:
            raise FlowforceError(f"unknown activation {activation!r}; valid names: {', '.join(sorted(_ACTIVATIONS))}")
        widths = [in_features, *hidden, out_features]
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(n_in, n_out))
            if i < len(widths) - 2:
                layers.append(_ACTIVATIONS[activation]())
        super().__init__(*layers)
        if zero_last:
            nn.init.zeros_(layers[-1].weight)
            nn.init.zeros_(layers[-1].bias)
