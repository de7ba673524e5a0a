"""E(n)-equivariant graph network that outputs one vector per particle (a score field).

:class:`EGNN` maps particle positions ``x`` (``(B, N, d)`` or flat ``(B, N·d)``) and a
per-configuration condition ``c`` (``(B, C)``, e.g. the diffusion time t) to a vector
field ``v(x, c)`` of the same shape as ``x`` with

.. math::
    v(x R + \\mathbf{1} b^\\top, c)_{\\pi} = v(x, c)_{\\pi} R

for every orthogonal R (rotations and reflections), translation b and particle
permutation π: rotations and permutations are carried through, translations are
dropped (the input is made mean-free first and the output is mean-free), which is what a
score of a translation-invariant density must do.

The layers are those of Satorras, Hoogeboom, Welling 2021 ("E(n) Equivariant Graph
Neural Networks", arXiv 2102.09844), written densely over all ordered pairs i ≠ j (the
graph is complete, and N ≤ 55 here, so an (B, N, N, H) message tensor is cheaper than
index scatter). As in the EGNN used by iDEM (Akhound-Sadegh et al. 2024, arXiv
2402.06121; itself from Garcia Satorras et al.'s E-NF code): messages see the current
squared distance and the squared distance of the *input* configuration, the coordinate
update moves along ``(x_i − x_j)/(|x_i − x_j| + 1)`` weighted by a bounded scalar
(``tanh``·``coord_range``/n_layers), messages are gated by a sigmoid attention, node
features are updated residually, and the output is ``x_L − x_0``.
"""
from __future__ import annotations

import torch
from torch import nn

from .mlp import _ACTIVATIONS
from ..errors import FlowforceError

Tensor = torch.Tensor

__all__ = ["EGNN", "EGNNLayer", "EGNNVectors"]


def _check_sizes(name: str, activation: str, n_particles: int, spatial_dim: int, n_layers: int, hidden: int,
                 **more: int) -> None:
    """One error line for an unknown activation or a size out of range (``more``: extra counts ≥ 1)."""
    if activation not in _ACTIVATIONS:
        raise FlowforceError(f"unknown activation {activation!r}; valid names: {', '.join(sorted(_ACTIVATIONS))}")
    sizes = {"spatial_dim": spatial_dim, "n_layers": n_layers, "hidden": hidden, **more}
    if n_particles < 2 or min(sizes.values()) < 1:
        got = ", ".join(f"{k}={v}" for k, v in sizes.items())
        raise FlowforceError(f"{name} needs n_particles >= 2 and positive {', '.join(sizes)}; "
                             f"got n_particles={n_particles}, {got}")


class EGNNLayer(nn.Module):
    """One E(n)-equivariant message-passing layer on a complete graph.

    .. math::
        m_{ij} &= \\phi_e(h_i, h_j, |x_i − x_j|^2, |x^0_i − x^0_j|^2)\\,
                  \\sigma(\\phi_a(\\cdot)), \\\\
        x_i' &= x_i + \\sum_{j \\ne i} \\frac{x_i − x_j}{|x_i − x_j| + 1}\\, \\phi_x(m_{ij}), \\\\
        h_i' &= h_i + \\phi_h\\big(h_i, \\textstyle\\sum_{j \\ne i} m_{ij}\\big).

    Args:
        hidden: width H of node features and messages.
        activation: name of the activation (see :class:`~openmm_flowforce.nn.MLP`).
        attention: gate each message by a sigmoid of a linear function of it.
        coord_range: if given, ``φ_x = coord_range · tanh(·)`` bounds each pair's step.
        log_distances: read ``log(1 + r²)`` instead of ``r²`` (both squared distances), so
            far-apart configurations give O(log r) features rather than O(r²) ones.
    """

    def __init__(self, hidden: int, activation: str = "silu", attention: bool = True,
                 coord_range: float | None = None, log_distances: bool = False):
        super().__init__()
        self.log_distances = bool(log_distances)
        act = _ACTIVATIONS[activation]
        # The first edge layer acts on [h_i, h_j, r², r²_input]; it is split into its node
        # parts (computed once per node, not per pair) and its distance part: the same map
        # as one Linear on the concatenation, N times fewer multiplications.
        self.edge_source = nn.Linear(hidden, hidden)
        self.edge_target = nn.Linear(hidden, hidden, bias=False)
        self.edge_distance = nn.Linear(2, hidden, bias=False)
        self.edge_mlp = nn.Sequential(act(), nn.Linear(hidden, hidden), act())
        self.attention = nn.Sequential(nn.Linear(hidden, 1), nn.Sigmoid()) if attention else None
        last = nn.Linear(hidden, 1, bias=False)
        # Start close to the identity map: tiny coordinate steps (as the reference EGNN does).
        nn.init.xavier_uniform_(last.weight, gain=1e-3)
        self.coord_mlp = nn.Sequential(nn.Linear(hidden, hidden), act(), last)
        self.node_mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), act(), nn.Linear(hidden, hidden))
        self.coord_range = None if coord_range is None else float(coord_range)

    def forward(self, h: Tensor, x: Tensor, r2_input: Tensor, off_diagonal: Tensor) -> tuple[Tensor, Tensor]:
        """Args: h ``(B, N, H)``, x ``(B, N, d)``, r2_input ``(B, N, N, 1)`` squared input
        distances, off_diagonal ``(N, N, 1)`` float, 1 where i ≠ j. Returns (h', x')."""
        diff = x[:, :, None, :] - x[:, None, :, :]                    # x_i − x_j, (B, N, N, d)
        r2 = diff.pow(2).sum(-1, keepdim=True)
        distances = torch.cat([r2, r2_input], dim=-1)
        if self.log_distances:
            distances = torch.log1p(distances)
        pre = (self.edge_source(h)[:, :, None, :] + self.edge_target(h)[:, None, :, :]
               + self.edge_distance(distances))
        m = self.edge_mlp(pre)
        if self.attention is not None:
            m = m * self.attention(m)
        m = m * off_diagonal
        weight = self.coord_mlp(m)
        if self.coord_range is not None:
            weight = self.coord_range * torch.tanh(weight)
        # +1 in the denominator keeps the step bounded for close pairs; 1e-8 keeps sqrt
        # differentiable on the diagonal (masked anyway).
        unit = diff / (torch.sqrt(r2 + 1e-8) + 1.0)
        x = x + (unit * weight * off_diagonal).sum(2)
        h = h + self.node_mlp(torch.cat([h, m.sum(2)], dim=-1))
        return h, x


class EGNN(nn.Module):
    """E(n)-equivariant vector field ``v(x, c)`` for N identical particles in d dimensions.

    Args:
        n_particles: N.
        spatial_dim: d.
        n_conditions: width C of the per-configuration condition (1 for a time t).
        hidden: node/message width H.
        n_layers: message-passing layers.
        activation: activation name ("silu", "tanh", "gelu", "relu").
        attention: sigmoid-gated messages.
        coord_range: total bound on the coordinate steps (split evenly over the layers;
            15 as in iDEM's EGNN with ``tanh=True``), or None for unbounded steps.

    ``forward(x, c)``: x ``(B, N, d)`` or flat ``(B, N·d)``, c ``(B, C)`` (or ``(B,)``
    when C = 1) → v of x's shape, mean-free over particles.
    """

    def __init__(self, n_particles: int, spatial_dim: int, n_conditions: int = 1, hidden: int = 64,
                 n_layers: int = 3, activation: str = "silu", attention: bool = True,
                 coord_range: float | None = 15.0):
        super().__init__()
        _check_sizes("EGNN", activation, n_particles, spatial_dim, n_layers, hidden, n_conditions=n_conditions)
        self.n_particles, self.spatial_dim, self.n_conditions = int(n_particles), int(spatial_dim), int(n_conditions)
        self.embedding = nn.Linear(n_conditions, hidden)
        per_layer = None if coord_range is None else float(coord_range) / n_layers
        self.layers = nn.ModuleList([EGNNLayer(hidden, activation, attention, per_layer) for _ in range(n_layers)])
        self.register_buffer("off_diagonal", (1.0 - torch.eye(n_particles))[:, :, None], persistent=False)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        flat = x.dim() == 2
        b = x.shape[0]
        p = x.reshape(b, self.n_particles, self.spatial_dim)
        p = p - p.mean(dim=1, keepdim=True)
        c = c.reshape(b, -1).to(p.dtype)
        if c.shape[1] != self.n_conditions:
            raise FlowforceError(f"condition has {c.shape[1]} features, the EGNN was built for {self.n_conditions}")
        off_diagonal = self.off_diagonal.to(p.dtype)
        h = self.embedding(c)[:, None, :].expand(b, self.n_particles, -1)
        r2_input = (p[:, :, None, :] - p[:, None, :, :]).pow(2).sum(-1, keepdim=True)
        y = p
        for layer in self.layers:
            h, y = layer(h, y, r2_input, off_diagonal)
        v = y - p
        v = v - v.mean(dim=1, keepdim=True)
        return v.reshape(x.shape) if flat else v


class EGNNVectors(nn.Module):
    """E(n)-equivariant network returning K vectors and invariant features per particle.

    The trunk is :class:`EGNNLayer` message passing from a learned initial node feature
    (the same for every particle, so permutations are carried through); the readout sums
    K learned, invariant weights of the final messages along the unit pair directions:

    .. math::
        v^k_i = \\sum_{j \\ne i} \\frac{y_i − y_j}{|y_i − y_j| + 1}\\, \\psi_k(m_{ij}),

    so ``v(P R + 1 b^T)_π = v(P)_π R`` for every orthogonal R, translation b and
    permutation π, and the features ``h`` are invariant. This is the "EGNN that outputs
    equivariant vectors and invariant features" of the equivariant augmented coupling
    flows (Midgley et al., NeurIPS 2023, arXiv 2308.10364, Sec. 3.2), written for
    :mod:`openmm_flowforce.flows.equivariant`.

    Args:
        n_particles, spatial_dim: N and d.
        n_vectors: K vectors per particle.
        hidden: node/message width H (also the width of the returned features).
        n_layers: message-passing layers.
        activation: activation name.
        coord_range: total bound on the trunk's coordinate steps (None: unbounded).

    ``forward(p)``: positions ``(B, N, d)`` → vectors ``(B, N, K, d)``, features ``(B, N, H)``
    (layer-normalised per particle).
    """

    def __init__(self, n_particles: int, spatial_dim: int, n_vectors: int, hidden: int = 32, n_layers: int = 2,
                 activation: str = "silu", coord_range: float | None = 5.0):
        super().__init__()
        _check_sizes("EGNNVectors", activation, n_particles, spatial_dim, n_layers, hidden, n_vectors=n_vectors)
        self.n_particles, self.spatial_dim, self.n_vectors = int(n_particles), int(spatial_dim), int(n_vectors)
        self.initial = nn.Parameter(torch.randn(hidden) / hidden ** 0.5)
        per_layer = None if coord_range is None else float(coord_range) / n_layers
        # log(1 + r²) features: a flow is evaluated far from the data too (HMC in FAB's AIS),
        # where raw r² features made the frames, and so log q, blow up.
        self.layers = nn.ModuleList([EGNNLayer(hidden, activation, True, per_layer, log_distances=True)
                                     for _ in range(n_layers)])
        act = _ACTIVATIONS[activation]
        # Node features grow with the squared distances they read; normalising them keeps
        # the readout and the flow's transform parameters O(1) at any configuration scale.
        self.norm = nn.LayerNorm(hidden)
        self.readout_source = nn.Linear(hidden, hidden)
        self.readout_target = nn.Linear(hidden, hidden, bias=False)
        self.readout_distance = nn.Linear(2, hidden, bias=False)
        self.readout = nn.Sequential(act(), nn.Linear(hidden, hidden), act(), nn.Linear(hidden, n_vectors))
        self.register_buffer("off_diagonal", (1.0 - torch.eye(n_particles))[:, :, None], persistent=False)

    def forward(self, p: Tensor) -> tuple[Tensor, Tensor]:
        b = p.shape[0]
        p = p - p.mean(dim=1, keepdim=True)
        off_diagonal = self.off_diagonal.to(p.dtype)
        h = self.initial.to(p.dtype).expand(b, self.n_particles, -1)
        r2_input = (p[:, :, None, :] - p[:, None, :, :]).pow(2).sum(-1, keepdim=True)
        y = p
        for layer in self.layers:
            h, y = layer(h, y, r2_input, off_diagonal)
        h = self.norm(h)
        diff = y[:, :, None, :] - y[:, None, :, :]
        r2 = diff.pow(2).sum(-1, keepdim=True)
        pre = (self.readout_source(h)[:, :, None, :] + self.readout_target(h)[:, None, :, :]
               + self.readout_distance(torch.log1p(torch.cat([r2, r2_input], dim=-1))))
        weight = self.readout(pre) * off_diagonal                       # (B, N, N, K)
        unit = diff / (torch.sqrt(r2 + 1e-8) + 1.0)                      # (B, N, N, d)
        vectors = torch.einsum("bijk,bijd->bikd", weight, unit)
        return vectors, h
