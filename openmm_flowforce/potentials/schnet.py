r"""CGSchNet: priors plus an invariant message-passing network over bead pairs.

SchNet (Schütt, Kindermans, Sauceda, Chmiela, Tkatchenko, Müller, "SchNet: a continuous-filter
convolutional neural network for modeling quantum interactions", NeurIPS 2017,
arXiv:1706.08566) as used for coarse-grained proteins by CGSchNet (Husic, Charron, Lemm,
Wang, Pérez, Majewski, Krämer, Chen, Olsson, De Fabritiis, Noé, Clementi, "Coarse graining
molecular dynamics with graph neural networks", J. Chem. Phys. 153, 194101 (2020),
arXiv:2007.11412):

    h_i⁰ = embedding(type_i)                                          (F features per bead)
    e_k(d) = exp(−γ (d − μ_k)²),  μ_k = k·r_c/(K−1),  γ = 1/(2Δ²)      (K radial functions)
    f_c(d) = ½ (cos(π d / r_c) + 1) for d < r_c, else 0               (smooth cutoff)
    W_ij = f_c(d_ij) · Dense(ssp(Dense(e(d_ij))))                     (continuous filter)
    h_i^{t+1} = h_i^t + Dense(ssp(Dense(Σ_{j≠i} Dense(h_j^t) ∘ W_ij)))  (interaction block)
    E_net = kT · Σ_i Dense(ssp(Dense(h_i^T)))                         (per-bead readout)
    E = Σ_priors E_prior + E_net

with ``ssp(x) = softplus(x) − log 2`` (smooth, so forces are smooth) and distances in nm.
Only distances enter, so E is invariant under rotations, translations and reflections and
the forces ``−∇E`` are equivariant; the network part is invariant under any permutation of
beads of the same type (the priors act on bonded tuples with per-tuple parameters, so the
total energy is invariant only under permutations that map the bond graph and its fitted
parameters onto themselves). ``f_c`` and ``f_c'`` vanish at ``r_c``: energy and forces are
continuous as a pair crosses the cutoff.

Export. The pairs are a fixed buffer of all ``i < j`` (``n(n−1)/2`` of them, fine for tens to
hundreds of beads); pairs beyond the cutoff get zero filters rather than being dropped, so
there is no data-dependent control flow and ``torch.jit.script`` and ``torch.export`` (strict)
both take the module as written. For many beads, most pairs are beyond the cutoff:
``max_pairs`` then keeps a fixed-capacity neighbour list, the ``max_pairs`` shortest pairs per
configuration (``torch.topk``, a fixed shape), with the same energy while the list holds every
pair within the cutoff and NaN when it does not (:class:`SchNetEnergy`). The features are the pair distances (computed in float64 by
the compiled exports), the network maps them to ``(B, 1)``: the contract of
:class:`~openmm_flowforce.potentials.cg_net.CGNet`.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional

from ..errors import FlowforceError
from .cg_net import DEFAULT_PRIORS, CGNet, register_cg_net
from .priors import BeadGraph, distances

__all__ = ["CGSchNet", "PairDistances", "SCHNET_DEFAULTS", "SchNetEnergy", "ShiftedSoftplus", "cosine_cutoff",
           "shifted_softplus"]

#: Default architecture (``flowforce cg --net schnet``): cutoff 1.2 nm reaches a few Cα
#: neighbours beyond the bonded ones (Cα–Cα bond 0.38 nm); 3 interactions, 64 features and 32
#: radial functions are modest sizes (the step cost grows as pairs × hidden², BENCHMARKS.md).
SCHNET_DEFAULTS: dict[str, Any] = {"hidden": 64, "interactions": 3, "n_rbf": 32, "cutoff_nm": 1.2}


def shifted_softplus(x: Tensor) -> Tensor:
    """``softplus(x) − log 2``: SchNet's activation, smooth and zero at 0."""
    return functional.softplus(x) - 0.6931471805599453  # log 2 (a literal: TorchScript has no globals)


class ShiftedSoftplus(nn.Module):
    """:func:`shifted_softplus` as a module (for ``nn.Sequential``)."""

    def forward(self, x: Tensor) -> Tensor:
        return shifted_softplus(x)


def cosine_cutoff(d: Tensor, cutoff: float) -> Tensor:
    """``½ (cos(π d / r_c) + 1)`` for ``d < r_c``, else 0; value and slope vanish at ``r_c``.

    ``torch.where`` rather than a mask index keeps the shape fixed (exportable); the cosine
    branch is finite everywhere, so its masked-out gradient is a clean zero."""
    return torch.where(d < cutoff, 0.5 * (torch.cos(d * (math.pi / cutoff)) + 1.0), torch.zeros_like(d))


class PairDistances(nn.Module):
    """Features of CGSchNet: distances ``(B, M)`` nm of all pairs ``i < j`` of ``(B, n, 3)``."""

    def __init__(self, graph: BeadGraph):
        super().__init__()
        n = graph.n_beads
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        self.register_buffer("pairs", torch.tensor(pairs, dtype=torch.long).reshape(-1, 2))

    def forward(self, x: Tensor) -> Tensor:
        return distances(x, self.pairs)

    def fit(self, positions: Tensor) -> None:
        """Nothing to fit: distances need no standardisation (the radial basis spans [0, r_c])."""


class Interaction(nn.Module):
    """One SchNet interaction block (continuous-filter convolution + atom-wise layers), the
    residual update ``h ← h + v`` of the module docstring. The filter's first layer is applied
    by :class:`SchNetEnergy` for all blocks at once (:meth:`filter_weights`)."""

    def __init__(self, hidden: int, n_rbf: int):
        super().__init__()
        self.filter = nn.Sequential(nn.Linear(n_rbf, hidden), ShiftedSoftplus(), nn.Linear(hidden, hidden))
        self.in_to_filter = nn.Linear(hidden, hidden, bias=False)
        self.update = nn.Sequential(nn.Linear(hidden, hidden), ShiftedSoftplus(), nn.Linear(hidden, hidden))

    def filter_weights(self) -> tuple[Tensor, Tensor]:
        """Weight ``(F, K)`` and bias ``(F,)`` of the filter's first layer."""
        first = self.filter[0]
        return first.weight, first.bias

    def forward(self, h: Tensor, hidden_filter: Tensor, cut: Tensor, bead_i: Tensor, bead_j: Tensor) -> Tensor:
        """``h (n·B, F)`` bead features (row ``bead·B + b``); ``hidden_filter (P·B, F)`` this block's
        ``ssp(Dense(e(d)))`` and ``cut (P·B, 1)`` of P pairs per configuration; ``bead_i``,
        ``bead_j`` ``(P·B,)`` the rows of the pair's two beads.

        The filter of a pair serves both directions, so messages go i → j and j → i from one
        filter row (no mirrored copy of the filters). Rows first: gathering and scattering whole
        rows along dim 0 is what torch's CPU kernels do fast."""
        w = functional.linear(hidden_filter, self.filter[2].weight, self.filter[2].bias) * cut
        to_filter = self.in_to_filter(h)
        pooled = torch.zeros_like(h).index_add(0, bead_i, to_filter[bead_j] * w).index_add(0, bead_j, to_filter[bead_i] * w)
        return h + self.update(pooled)


class SchNetEnergy(nn.Module):
    """The network part of CGSchNet: pair distances ``(B, M)`` nm → energy ``(B, 1)`` in kT.

    Args:
        bead_types: ``(n,)`` type index of every bead (row of the embedding).
        n_types: rows of the embedding.
        hidden: F, features per bead.
        interactions: T, interaction blocks.
        n_rbf: K, Gaussian radial functions on [0, r_c].
        cutoff_nm: r_c.
        max_pairs: None: every pair goes through the filters (beyond r_c with a zero filter).
            P < M: a fixed-capacity neighbour list, the P shortest pairs of each configuration
            (``torch.topk``: fixed shapes, so it exports); the energy is the same as with all
            pairs as long as at most P pairs are closer than r_c. If more are, the energy and
            forces of that configuration are NaN rather than silently wrong (MD stops with a
            NaN error; raise ``max_pairs``).

    Where the time goes and what this does about it (BENCHMARKS.md "CGSchNet speed"): the
    filter networks on every pair, forward and backward, dominate; their first layers take
    the same radial basis, so one matrix product serves all T blocks; each pair's filter serves
    both message directions; and with ``max_pairs`` only pairs that can be within r_c pay.
    """

    def __init__(self, bead_types: Sequence[int], n_types: int, hidden: int, interactions: int, n_rbf: int,
                 cutoff_nm: float, max_pairs: int | None = None):
        super().__init__()
        n = len(bead_types)
        pairs = torch.tensor([(i, j) for i in range(n) for j in range(i + 1, n)], dtype=torch.long).reshape(-1, 2)
        self.register_buffer("bead_types", torch.tensor(list(bead_types), dtype=torch.long))
        # Both directions, as model files have always stored them; forward uses the first half.
        self.register_buffer("senders", torch.cat([pairs[:, 1], pairs[:, 0]]))
        self.register_buffer("receivers", torch.cat([pairs[:, 0], pairs[:, 1]]))
        spacing = cutoff_nm / (n_rbf - 1)
        self.register_buffer("centres", torch.linspace(0.0, cutoff_nm, n_rbf))
        self.gamma = 0.5 / spacing ** 2
        self.cutoff = float(cutoff_nm)
        self.n_pairs = len(pairs)
        # 0: all pairs (an int, not Optional, so TorchScript sees one type)
        self.max_pairs = 0 if max_pairs is None or int(max_pairs) >= len(pairs) else int(max_pairs)
        self.embedding = nn.Embedding(n_types, hidden)
        self.interactions = nn.ModuleList([Interaction(hidden, n_rbf) for _ in range(interactions)])
        self.readout = nn.Sequential(nn.Linear(hidden, hidden // 2 or 1), ShiftedSoftplus(),
                                     nn.Linear(hidden // 2 or 1, 1))
        # An untrained net adds nothing: the model starts as its priors.
        nn.init.zeros_(self.readout[-1].weight)
        nn.init.zeros_(self.readout[-1].bias)

    def forward(self, d: Tensor) -> Tensor:
        batch, n_pairs = d.shape[0], self.n_pairs
        pair_i, pair_j = self.receivers[:n_pairs], self.senders[:n_pairs]
        overflow = torch.zeros(batch, dtype=torch.bool, device=d.device)
        if self.max_pairs > 0:
            overflow = (d < self.cutoff).sum(1) > self.max_pairs
            # The P shortest pairs of each configuration: (B, P) distances and pair indices.
            d, chosen = torch.topk(d, self.max_pairs, dim=1, largest=False, sorted=False)
            bead_i, bead_j = pair_i[chosen].t(), pair_j[chosen].t()  # (P, B)
        else:
            bead_i = pair_i.unsqueeze(1).expand(n_pairs, batch)
            bead_j = pair_j.unsqueeze(1).expand(n_pairs, batch)
        d = d.t()  # (P, B): pairs first, rows bead·B + b below (see Interaction.forward)
        column = torch.arange(batch, device=d.device)
        bead_i, bead_j = (bead_i * batch + column).reshape(-1), (bead_j * batch + column).reshape(-1)
        d = d.reshape(-1, 1)
        rbf = torch.exp(-self.gamma * (d - self.centres) ** 2)
        cut = cosine_cutoff(d, self.cutoff)
        n_beads = self.bead_types.shape[0]
        h = self.embedding(self.bead_types).unsqueeze(1).expand(-1, batch, -1).reshape(n_beads * batch, -1)
        if len(self.interactions) > 0:
            weights, biases = [], []
            for block in self.interactions:
                weight, bias = block.filter_weights()
                weights.append(weight)
                biases.append(bias)
            # every block's first filter layer in one product: (P·B, K) → (P·B, T·F)
            hidden_filters = shifted_softplus(functional.linear(rbf, torch.cat(weights), torch.cat(biases)))
            width = h.shape[1]
            for t, block in enumerate(self.interactions):
                h = block(h, hidden_filters[:, t * width:(t + 1) * width], cut, bead_i, bead_j)
        energy = self.readout(h).reshape(n_beads, batch).sum(0).unsqueeze(-1)
        if self.max_pairs > 0:
            # More pairs within r_c than the list holds: NaN energy and forces, not a wrong answer.
            nan = torch.full_like(energy, math.nan)
            energy = energy * torch.where(overflow.unsqueeze(-1), nan, torch.ones_like(energy))
        return energy


@register_cg_net("schnet")
class CGSchNet(CGNet):
    """Priors plus a SchNet energy of CG bead positions (module docstring has the maths).

    Args:
        n_beads: beads of the CG molecule (at least 2).
        bonds: bead pairs ``(i, j)``, for the priors (the network sees all pairs).
        bead_types: type index of every bead, e.g.
            :attr:`~openmm_flowforce.coordinates.cg_mapping.CGMapping.type_indices`
            (:meth:`from_data` with a mapping fills it in); default: one type for all.
        n_types: rows of the type embedding; default the size of
            :data:`~openmm_flowforce.coordinates.cg_mapping.BEAD_TYPES`.
        hidden: F, features per bead.
        interactions: T, interaction blocks.
        n_rbf: K, radial basis functions (at least 2).
        cutoff_nm: r_c, nm.
        max_pairs: None (default): every pair through the filters. An int P: a neighbour list of
            the P shortest pairs per configuration (:class:`SchNetEnergy`): the same energy, less
            work when most pairs are beyond r_c (tens of beads and more); :meth:`fit_priors`
            refuses a P that the data already exceed.
        priors: as :class:`~openmm_flowforce.potentials.cg_net.CGEnergyNet`.
        temperature: K; the network's energy unit is kT at this temperature.
    """

    NET = "schnet"
    CONFIG_KEYS = ("n_beads", "bonds", "bead_types", "n_types", "hidden", "interactions", "n_rbf", "cutoff_nm",
                   "max_pairs", "priors", "temperature")
    OPTIONAL_CONFIG_KEYS = ("max_pairs",)  # model files written before it existed have all pairs

    def __init__(self, n_beads: int, bonds: Sequence[Sequence[int]], bead_types: Sequence[int] | None = None,
                 n_types: int | None = None, hidden: int = SCHNET_DEFAULTS["hidden"],
                 interactions: int = SCHNET_DEFAULTS["interactions"], n_rbf: int = SCHNET_DEFAULTS["n_rbf"],
                 cutoff_nm: float = SCHNET_DEFAULTS["cutoff_nm"], max_pairs: int | None = None,
                 priors: Sequence[str] | Mapping[str, Any] = tuple(DEFAULT_PRIORS), temperature: float = 300.0):
        graph, prior_options = self._init_priors(n_beads, bonds, priors, temperature)
        if n_types is None:
            from ..coordinates.cg_mapping import BEAD_TYPES

            n_types = len(BEAD_TYPES)
        types = [0] * int(n_beads) if bead_types is None else [int(t) for t in bead_types]
        problems = {"hidden": int(hidden) >= 1, "interactions": int(interactions) >= 0, "n_rbf": int(n_rbf) >= 2,
                    "cutoff_nm": float(cutoff_nm) > 0 and math.isfinite(float(cutoff_nm)),
                    "bead_types": len(types) == int(n_beads) and all(0 <= t < int(n_types) for t in types),
                    "max_pairs": max_pairs is None or int(max_pairs) >= 1}
        bad = [name for name, ok in problems.items() if not ok]
        if bad:
            raise FlowforceError(f"CGSchNet: bad {', '.join(bad)} (need hidden ≥ 1, interactions ≥ 0, n_rbf ≥ 2, "
                                 f"cutoff_nm > 0, max_pairs ≥ 1 or None, one bead type in [0, {n_types}) per bead for {n_beads} beads)")
        self._config = {"net": self.NET, "n_beads": int(n_beads), "bonds": [list(b) for b in graph.bonds],
                        "bead_types": types, "n_types": int(n_types), "hidden": int(hidden),
                        "interactions": int(interactions), "n_rbf": int(n_rbf), "cutoff_nm": float(cutoff_nm),
                        "max_pairs": None if max_pairs is None else int(max_pairs),
                        "priors": copy.deepcopy(prior_options), "temperature": float(temperature)}
        self.features = PairDistances(graph)
        self.network = SchNetEnergy(types, int(n_types), int(hidden), int(interactions), int(n_rbf),
                                    float(cutoff_nm), max_pairs)

    @torch.no_grad()
    def fit_priors(self, positions: Any, temperature: float) -> None:
        """As :meth:`CGNet.fit_priors`; also checks that ``max_pairs`` holds every pair within
        r_c in these positions.

        Raises:
            FlowforceError: a frame has more pairs within the cutoff than ``max_pairs``."""
        super().fit_priors(positions, temperature)
        limit = self._config["max_pairs"]
        if limit is not None:
            x = torch.as_tensor(np.asarray(positions) if not isinstance(positions, Tensor) else positions)
            d = self.features(x.detach().to(self.energy_scale.device, torch.float64))
            most = int((d < self._config["cutoff_nm"]).sum(1).max())
            if most > int(limit):
                raise FlowforceError(f"CGSchNet: max_pairs={limit} but the data have up to {most} pairs within the "
                                     f"{self._config['cutoff_nm']:g} nm cutoff; set max_pairs to at least "
                                     f"{math.ceil(1.25 * most)} (25 % headroom) or leave it unset (all pairs)")

    @classmethod
    def options_from_mapping(cls, mapping: Any, options: dict[str, Any]) -> dict[str, Any]:
        """The mapping's bead types, unless ``bead_types`` is given."""
        if options.get("bead_types") is None:
            options["bead_types"] = list(mapping.type_indices)
        return options
