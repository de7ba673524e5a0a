"""Coupling flows on the unit cube with interval and periodic dimensions.

Each coupling layer splits the dimensions into a conditioning set and a ``transformed``
set; an MLP reads the conditioning set (interval dims as 2x − 1, periodic dims as
(cos 2πx, sin 2πx), so the conditioner is smooth and periodic on the circle) and outputs
the unconstrained parameters of an elementwise transform family (``"smooth"``: Köhler,
Krämer, Noé, arXiv 2110.00351; ``"spline"``: Durkan et al., arXiv 1906.04032) for the
transformed dims. The base distribution is uniform on the cube (log density 0).

Direction: ``to_latent(x)`` (data → latent) is analytic; density, energy and forces use it.
``to_data(z)`` inverts each layer (root finding for smooth transforms) and is used for
sampling.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..bijections import get_family
from ..nn import MLP
from ..errors import FlowforceError

Tensor = torch.Tensor


def _split(dim: int, layer: int) -> list[int]:
    """Indices transformed by ``layer``: alternating parity, then alternating halves."""
    if dim == 1:
        return [0]
    if (layer // 2) % 2 == 0:
        return [i for i in range(dim) if i % 2 == layer % 2]
    half = dim // 2
    return list(range(half)) if layer % 2 == 0 else list(range(half, dim))


class CouplingLayer(nn.Module):
    """One coupling layer: transforms ``transformed`` dims conditioned on the others.

    Args:
        periodic: (D,) which dimensions are circles.
        transformed: indices of the dimensions this layer transforms.
        transform: name of the elementwise family ("smooth" or "spline").
        n_components: mixture components (smooth) or bins (spline).
        hidden: conditioner hidden widths.
        identity_init: start as (close to) the identity map.
    """

    def __init__(self, periodic: Sequence[bool], transformed: Sequence[int], transform: str,
                 n_components: int, hidden: Sequence[int], identity_init: bool):
        super().__init__()
        dim = len(periodic)
        self.family = get_family(transform)
        is_transformed = torch.zeros(dim, dtype=torch.bool)
        is_transformed[list(transformed)] = True
        is_periodic = torch.tensor([bool(p) for p in periodic], dtype=torch.bool)
        idx = torch.arange(dim)
        conditioning = idx[~is_transformed]
        self.register_buffer("conditioning", conditioning, persistent=False)
        self.register_buffer("conditioning_interval", conditioning[~is_periodic[conditioning]], persistent=False)
        self.register_buffer("conditioning_periodic", conditioning[is_periodic[conditioning]], persistent=False)
        self.register_buffer("transformed_interval", idx[is_transformed & ~is_periodic], persistent=False)
        self.register_buffer("transformed_periodic", idx[is_transformed & is_periodic], persistent=False)
        order = torch.cat([conditioning, self.transformed_interval, self.transformed_periodic])
        self.register_buffer("unsort", torch.argsort(order), persistent=False)

        self.n_params_interval = self.family.n_params(n_components, False)
        self.n_params_periodic = self.family.n_params(n_components, True)
        n_in = len(self.conditioning_interval) + 2 * len(self.conditioning_periodic)
        n_out = (len(self.transformed_interval) * self.n_params_interval
                 + len(self.transformed_periodic) * self.n_params_periodic)
        # A layer with nothing to condition on learns unconditional parameters from a constant input.
        self.conditioner = MLP(max(n_in, 1), n_out, hidden, zero_last=identity_init)
        offset = torch.cat([
            self.family.identity_raw(n_components, False).repeat(len(self.transformed_interval)),
            self.family.identity_raw(n_components, True).repeat(len(self.transformed_periodic)),
        ]) if identity_init else torch.zeros(n_out)
        self.register_buffer("raw_offset", offset.to(torch.get_default_dtype()))

    def _features(self, x: Tensor) -> Tensor:
        ang = 2.0 * math.pi * x[:, self.conditioning_periodic]
        feats = torch.cat([2.0 * x[:, self.conditioning_interval] - 1.0, torch.cos(ang), torch.sin(ang)], dim=1)
        if feats.shape[1] == 0:
            feats = x.new_ones(x.shape[0], 1)
        return feats

    def _bijections(self, x: Tensor):
        raw = self.conditioner(self._features(x)) + self.raw_offset
        n_int = len(self.transformed_interval) * self.n_params_interval
        raw_int = raw[:, :n_int].reshape(x.shape[0], -1, self.n_params_interval)
        raw_per = raw[:, n_int:].reshape(x.shape[0], -1, self.n_params_periodic)
        return self.family.build(raw_int, False), self.family.build(raw_per, True)

    def _transform(self, x: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        bij_int, bij_per = self._bijections(x)
        parts, ladj = [x[:, self.conditioning]], x.new_zeros(x.shape[0])
        for bij, index in ((bij_int, self.transformed_interval), (bij_per, self.transformed_periodic)):
            if len(index) == 0:
                continue
            y, l = bij.inverse(x[:, index]) if inverse else bij.forward(x[:, index])
            parts.append(y)
            ladj = ladj + l
        return torch.cat(parts, dim=1)[:, self.unsort], ladj

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._transform(x, inverse=False)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._transform(y, inverse=True)


class CouplingFlow(nn.Module):
    """A normalizing flow on the unit cube ``[0, 1]^D`` with a uniform base distribution.

    Args:
        periodic: one boolean per dimension; True makes that dimension a circle [0, 1).
        transform: elementwise family, ``"smooth"`` (C∞, root-finding inverse),
            ``"spline"`` (rational-quadratic, C¹, analytic inverse) or ``"ispline"``
            (I-spline, C³, root-finding inverse; ``"ispline-cS"`` for C^S).
        n_layers: coupling layers; each dimension is transformed by about half of them.
        hidden: conditioner hidden widths (an int means two layers of that width).
        n_components: mixture components (smooth) or bins (spline) per dimension.
        identity_init: start close to the identity map (uniform density).

    Example:
        >>> flow = CouplingFlow([True, False])
        >>> x = flow.sample(10)            # (10, 2) in [0, 1]²
        >>> flow.log_prob(x).shape
        torch.Size([10])
    """

    def __init__(self, periodic: Sequence[bool], transform: str = "smooth", n_layers: int = 4,
                 hidden: int | Sequence[int] = (64, 64), n_components: int = 8,
                 identity_init: bool = True):
        super().__init__()
        periodic = [bool(p) for p in periodic]
        if len(periodic) == 0:
            raise FlowforceError("periodic must list at least one dimension, e.g. CouplingFlow([True, False])")
        if n_layers < 1:
            raise FlowforceError(f"n_layers must be at least 1, got {n_layers}")
        get_family(transform)  # unknown names fail here, listing the valid ones
        hidden = (hidden, hidden) if isinstance(hidden, int) else tuple(hidden)
        self.config = dict(periodic=periodic, transform=transform, n_layers=n_layers, hidden=list(hidden),
                           n_components=n_components, identity_init=identity_init)
        self.register_buffer("periodic", torch.tensor(periodic, dtype=torch.bool), persistent=False)
        self.layers = nn.ModuleList(
            CouplingLayer(periodic, _split(len(periodic), i), transform, n_components, hidden, identity_init)
            for i in range(n_layers))

    @property
    def dim(self) -> int:
        return int(self.periodic.numel())

    def _check(self, x: Tensor, name: str) -> None:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise FlowforceError(f"{name} must have shape (batch, {self.dim}), got {tuple(x.shape)}")

    def to_latent(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Data → latent, analytic. Returns ``z`` (B, D) and ``ladj = log|det dz/dx|`` (B,)."""
        self._check(x, "x")
        ladj = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, l = layer(x)
            ladj = ladj + l
        return x, ladj

    def to_data(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Latent → data (root finding for smooth transforms). Returns ``x`` and ``log|det dx/dz|``."""
        self._check(z, "z")
        ladj = z.new_zeros(z.shape[0])
        for layer in reversed(self.layers):
            z, l = layer.inverse(z)
            ladj = ladj + l
        return z, ladj

    def log_prob(self, x: Tensor) -> Tensor:
        """log q(x) for x (B, D) in the unit cube: the uniform base has log density 0."""
        return self.to_latent(x)[1]

    def sample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        """Draw n samples (n, D) and their log q; gradients reach the parameters."""
        ref = self.layers[0].raw_offset
        z = torch.rand(n, self.dim, dtype=ref.dtype, device=ref.device)
        x, ladj = self.to_data(z)
        return x, -ladj

    def sample(self, n: int) -> Tensor:
        """Draw n samples (n, D)."""
        return self.sample_and_log_prob(n)[0]
