r"""Physical priors of CG energy networks, fitted to CG data by Boltzmann inversion.

Each prior is an ``nn.Module`` whose parameters are buffers (not trained) and whose
``forward(positions (B, n, 3) nm) -> (B,)`` energy in kJ/mol compiles with ``torch.jit.script``.
``fit(positions, temperature)`` sets the buffers from CG positions ``(T, n, 3)`` at temperature
T (kT = R·T, :func:`openmm_flowforce.conventions.kT`):

* ``bonds`` — :class:`HarmonicBonds`, ``E = Σ ½ k (r − r₀)²`` over bonded bead pairs;
* ``angles`` — :class:`HarmonicAngles`, ``E = Σ ½ k (cos θ − c₀)²`` over bonded triples;
* ``repulsion`` — :class:`Repulsion`, ``E = ε Σ (σ/r)⁶`` over pairs ≥ 3 bonds apart, ε = kT;
* ``dihedrals`` — :class:`FourierDihedrals`, ``E = Σ_m Σ_{n≤K} a_mn cos nφ + b_mn sin nφ``.

Boltzmann inversion: if ``p(q) ∝ exp(−U(q)/kT)`` with ``U`` harmonic, then ``q`` is Gaussian with
mean ``q₀`` and variance ``kT/k``; so ``q₀ = mean``, ``k = kT / var``. This ignores the Jacobian
factors (``r²`` for a distance, ``sin θ`` for an angle), a relative error of order
``var/q₀²`` that is negligible for stiff bonds and angles. Angles are harmonic in ``cos θ``, not
θ, so energy and forces stay smooth at linear configurations (θ = π). The dihedral series is
fitted by maximum likelihood of ``p(φ) ∝ exp(−E(φ)/kT)`` (the exact Boltzmann inversion for a
Fourier-series potential; no histogram, so no bin width and no ``log 0`` in empty bins).
These are the priors of CGSchNet (Husic et al., J. Chem. Phys. 153, 194101 (2020),
arXiv:2007.11412) and of Köhler et al., JCTC 2023 (arXiv:2203.11167).

Which bead tuples the priors act on comes from the bond graph, :class:`BeadGraph`.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..conventions import kT as thermal_energy
from ..errors import FlowforceError

__all__ = ["BeadGraph", "FourierDihedrals", "HarmonicAngles", "HarmonicBonds", "PRIORS", "Repulsion",
           "build_prior", "cos_angles", "dihedral_angles", "dihedral_cos_sin", "dihedral_cos_sin_weighted", "distances"]

#: Floors on fitted standard deviations, so a constrained bond or angle gets a finite k.
MIN_BOND_STD_NM = 1e-3
MIN_COS_STD = 1e-3
#: Ridge on the dihedral series' natural parameters (in units of 1/kT): keeps the fit finite
#: when the data leave part of the circle empty.
DIHEDRAL_RIDGE = 1e-4
DIHEDRAL_GRID = 720


# -- geometry (scriptable) ----------------------------------------------------------------------
def distances(x: Tensor, pairs: Tensor) -> Tensor:
    """``|x_j − x_i|`` for pairs ``(M, 2)`` of positions ``(B, n, 3)``: ``(B, M)``."""
    return torch.linalg.vector_norm(x[:, pairs[:, 1]] - x[:, pairs[:, 0]], dim=-1)


def cos_angles(x: Tensor, triples: Tensor) -> Tensor:
    """cos of the angle i–j–k for triples ``(M, 3)``: ``(B, M)``."""
    a = x[:, triples[:, 0]] - x[:, triples[:, 1]]
    c = x[:, triples[:, 2]] - x[:, triples[:, 1]]
    return (a * c).sum(-1) / (torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(c, dim=-1))


def dihedral_cos_sin(x: Tensor, quads: Tensor) -> tuple[Tensor, Tensor]:
    """(cos φ, sin φ) of the IUPAC dihedral i–j–k–l (mdtraj's sign), each ``(B, M)``."""
    _, _, axis, v, w = _dihedral_frame(x, quads)
    norm = torch.linalg.vector_norm(v, dim=-1) * torch.linalg.vector_norm(w, dim=-1)
    return (v * w).sum(-1) / norm, (torch.cross(axis, v, dim=-1) * w).sum(-1) / norm


def _dihedral_frame(x: Tensor, quads: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Bond vectors b₀, b₂, the unit axis b̂₁ and the parts v, w of b₀, b₂ normal to it."""
    b0 = x[:, quads[:, 0]] - x[:, quads[:, 1]]
    b1 = x[:, quads[:, 2]] - x[:, quads[:, 1]]
    b2 = x[:, quads[:, 3]] - x[:, quads[:, 2]]
    axis = b1 / torch.linalg.vector_norm(b1, dim=-1, keepdim=True)
    v = b0 - (b0 * axis).sum(-1, keepdim=True) * axis
    w = b2 - (b2 * axis).sum(-1, keepdim=True) * axis
    return b0, b2, axis, v, w


def dihedral_cos_sin_weighted(x: Tensor, quads: Tensor) -> tuple[Tensor, Tensor]:
    """``sin θ₁ sin θ₂ · (cos φ, sin φ)`` of the dihedral i–j–k–l, each ``(B, M)``, with θ₁, θ₂ the
    angles i–j–k and j–k–l: smooth everywhere, also where an angle is linear.

    ``(cos φ, sin φ)`` alone is undefined at θ = π and its gradient grows as 1/sin θ near it, so
    an energy with any φ dependence through them has forces that diverge there (a CG net on
    chignolin's Cα beads, whose Gly angle reaches 179°, blew up in MD this way). Weighted, the
    features are ``(v·w, (b̂₁×v)·w) / (|b₀||b₂|)`` with ``v, w`` the bond vectors' parts normal
    to the axis, polynomial in the unit bond vectors: bounded gradients, and zero at θ = π
    where φ carries no information.
    """
    b0, b2, axis, v, w = _dihedral_frame(x, quads)
    norm = torch.linalg.vector_norm(b0, dim=-1) * torch.linalg.vector_norm(b2, dim=-1)
    return (v * w).sum(-1) / norm, (torch.cross(axis, v, dim=-1) * w).sum(-1) / norm


def dihedral_angles(x: Tensor, quads: Tensor) -> Tensor:
    """Dihedrals in (−π, π], ``(B, M)``."""
    cos, sin = dihedral_cos_sin(x, quads)
    return torch.atan2(sin, cos)


# -- which beads interact -----------------------------------------------------------------------
@dataclass(frozen=True)
class BeadGraph:
    """Bonded tuples of a CG molecule, derived from its bonds.

    Attributes:
        n_beads: number of beads.
        bonds: ``(i, j)`` with ``i < j``, sorted.
        angles: ``(i, j, k)``, j bonded to both i and k (for a chain: consecutive triples).
        dihedrals: ``(i, j, k, l)`` along bonds i–j, j–k, k–l (for a chain: consecutive quadruples).
        nonbonded: pairs at least 3 bonds apart (or in different molecules).
    """

    n_beads: int
    bonds: tuple[tuple[int, int], ...]
    angles: tuple[tuple[int, int, int], ...]
    dihedrals: tuple[tuple[int, int, int, int], ...]
    nonbonded: tuple[tuple[int, int], ...]

    @classmethod
    def from_bonds(cls, n_beads: int, bonds: Sequence[Sequence[int]]) -> "BeadGraph":
        """Raises ValueError for a bond naming a bead outside ``[0, n_beads)`` or a self-bond."""
        if n_beads < 1:
            raise FlowforceError(f"n_beads must be at least 1, got {n_beads}")
        pairs = sorted({(min(int(i), int(j)), max(int(i), int(j))) for i, j in bonds})
        bad = [p for p in pairs if p[0] == p[1] or p[0] < 0 or p[1] >= n_beads]
        if bad:
            raise FlowforceError(f"bonds {bad} do not join two different beads in [0, {n_beads})")
        neighbours: list[list[int]] = [[] for _ in range(n_beads)]
        for i, j in pairs:
            neighbours[i].append(j)
            neighbours[j].append(i)
        angles = sorted((i, j, k) for j in range(n_beads) for i in neighbours[j] for k in neighbours[j] if i < k)
        dihedrals = sorted((i, j, k, l) for j, k in pairs for i in neighbours[j] for l in neighbours[k]
                           if i != k and l != j and i != l)
        hops = np.full((n_beads, n_beads), np.inf)
        for start in range(n_beads):  # breadth-first search; CG molecules are small
            hops[start, start], frontier = 0, [start]
            while frontier:
                frontier_next = []
                for a in frontier:
                    for b in neighbours[a]:
                        if hops[start, b] == np.inf:
                            hops[start, b] = hops[start, a] + 1
                            frontier_next.append(b)
                frontier = frontier_next
        nonbonded = [(i, j) for i in range(n_beads) for j in range(i + 1, n_beads) if hops[i, j] >= 3]
        return cls(n_beads, tuple(pairs), tuple(angles), tuple(dihedrals), tuple(nonbonded))


def _index_buffer(tuples: Sequence[Sequence[int]], width: int) -> Tensor:
    return torch.tensor(list(tuples), dtype=torch.long).reshape(-1, width)


def _as_positions(positions: Any, device: torch.device) -> Tensor:
    x = torch.as_tensor(np.asarray(positions) if not isinstance(positions, Tensor) else positions)
    x = x.detach().to(device=device, dtype=torch.float64)  # fit next to the buffers
    if x.ndim != 3 or x.shape[-1] != 3 or x.shape[0] < 2:
        raise FlowforceError(f"positions to fit priors to must have shape (T ≥ 2, n, 3) nm, got {tuple(x.shape)}")
    return x


# -- priors -------------------------------------------------------------------------------------
class HarmonicBonds(nn.Module):
    """``E = Σ ½ k (r − r₀)²`` over bonded pairs; k in kJ/mol/nm², r₀ in nm."""

    def __init__(self, graph: BeadGraph):
        super().__init__()
        self.register_buffer("pairs", _index_buffer(graph.bonds, 2))
        self.register_buffer("k", torch.zeros(len(graph.bonds)))
        self.register_buffer("r0", torch.zeros(len(graph.bonds)))

    def fit(self, positions: Any, temperature: float) -> None:
        """r₀ = mean r, k = kT / var r over CG positions ``(T, n, 3)`` nm."""
        r = distances(_as_positions(positions, self.pairs.device), self.pairs)
        self.r0.copy_(r.mean(0))
        self.k.copy_(thermal_energy(temperature) / r.var(0).clamp_min(MIN_BOND_STD_NM ** 2))

    def forward(self, x: Tensor) -> Tensor:
        return (0.5 * self.k * (distances(x, self.pairs) - self.r0) ** 2).sum(-1)


class HarmonicAngles(nn.Module):
    """``E = Σ ½ k (cos θ − c₀)²`` over bonded triples; k in kJ/mol."""

    def __init__(self, graph: BeadGraph):
        super().__init__()
        self.register_buffer("triples", _index_buffer(graph.angles, 3))
        self.register_buffer("k", torch.zeros(len(graph.angles)))
        self.register_buffer("cos0", torch.zeros(len(graph.angles)))

    def fit(self, positions: Any, temperature: float) -> None:
        """c₀ = mean cos θ, k = kT / var cos θ."""
        c = cos_angles(_as_positions(positions, self.triples.device), self.triples)
        self.cos0.copy_(c.mean(0))
        self.k.copy_(thermal_energy(temperature) / c.var(0).clamp_min(MIN_COS_STD ** 2))

    def forward(self, x: Tensor) -> Tensor:
        return (0.5 * self.k * (cos_angles(x, self.triples) - self.cos0) ** 2).sum(-1)


class Repulsion(nn.Module):
    """``E = ε Σ (σ/r)⁶`` over pairs ≥ 3 bonds apart: keeps non-bonded beads from overlapping
    where the data never went.

    Args:
        graph: the bead graph.
        percentile: :meth:`fit` sets σ of each pair to this percentile (in %) of its observed
            distances, so the closest contacts seen cost about kT.
    """

    def __init__(self, graph: BeadGraph, percentile: float = 1.0):
        super().__init__()
        if not 0.0 <= percentile <= 100.0:
            raise FlowforceError(f"percentile must be in [0, 100], got {percentile}")
        self.percentile = float(percentile)
        self.register_buffer("pairs", _index_buffer(graph.nonbonded, 2))
        self.register_buffer("sigma", torch.zeros(len(graph.nonbonded)))
        self.register_buffer("epsilon", torch.zeros(()))

    def fit(self, positions: Any, temperature: float) -> None:
        """σ = ``percentile``-th percentile of each pair's distance, ε = kT."""
        r = distances(_as_positions(positions, self.pairs.device), self.pairs)
        if r.shape[1]:
            self.sigma.copy_(torch.quantile(r, self.percentile / 100.0, dim=0))
        self.epsilon.fill_(thermal_energy(temperature))

    def forward(self, x: Tensor) -> Tensor:
        return self.epsilon * ((self.sigma / distances(x, self.pairs)) ** 6).sum(-1)


class FourierDihedrals(nn.Module):
    """``E = Σ_m Σ_{n=1..K} a_mn cos nφ_m + b_mn sin nφ_m`` over bonded quadruples, kJ/mol.

    ``cos nφ`` and ``sin nφ`` come from ``(cos φ, sin φ)`` by the angle-addition recursion, so
    no ``atan2`` is on the force path.

    Args:
        graph: the bead graph.
        n_terms: K, the number of harmonics.
    """

    def __init__(self, graph: BeadGraph, n_terms: int = 3):
        super().__init__()
        if int(n_terms) < 1:
            raise FlowforceError(f"n_terms must be at least 1, got {n_terms}")
        self.n_terms = int(n_terms)
        self.register_buffer("quads", _index_buffer(graph.dihedrals, 4))
        self.register_buffer("a", torch.zeros(len(graph.dihedrals), self.n_terms))
        self.register_buffer("b", torch.zeros(len(graph.dihedrals), self.n_terms))

    def fit(self, positions: Any, temperature: float) -> None:
        """Maximum likelihood of ``p(φ) ∝ exp(−E(φ)/kT)`` for every dihedral (Newton's method
        on the concave log-likelihood, normalisation on a grid of 720 points)."""
        phi = dihedral_angles(_as_positions(positions, self.quads.device), self.quads).cpu().numpy()
        for m in range(phi.shape[1]):
            theta = _fit_circular_exponential_family(phi[:, m], self.n_terms)
            # p ∝ exp(θ·f(φ)) and p ∝ exp(−E/kT)  ⇒  E = −kT θ·f(φ)
            self.a[m] = torch.as_tensor(-thermal_energy(temperature) * theta[:self.n_terms])
            self.b[m] = torch.as_tensor(-thermal_energy(temperature) * theta[self.n_terms:])

    def forward(self, x: Tensor) -> Tensor:
        cos, sin = dihedral_cos_sin(x, self.quads)
        energy = torch.zeros_like(cos)
        cos_n, sin_n = cos, sin
        for n in range(self.n_terms):
            energy = energy + self.a[:, n] * cos_n + self.b[:, n] * sin_n
            cos_n, sin_n = cos_n * cos - sin_n * sin, sin_n * cos + cos_n * sin
        return energy.sum(-1)


def _fourier_basis(phi: np.ndarray, n_terms: int) -> np.ndarray:
    n = np.arange(1, n_terms + 1)
    return np.concatenate([np.cos(phi[:, None] * n), np.sin(phi[:, None] * n)], axis=1)


def _fit_circular_exponential_family(phi: np.ndarray, n_terms: int) -> np.ndarray:
    """θ maximising ``mean θ·f(φ) − log ∫ exp(θ·f) dφ − ½λ|θ|²`` for the Fourier basis f."""
    grid = _fourier_basis(np.linspace(-math.pi, math.pi, DIHEDRAL_GRID, endpoint=False), n_terms)
    f_mean = _fourier_basis(phi, n_terms).mean(0)

    def objective(theta: np.ndarray) -> float:
        logits = grid @ theta
        top = logits.max()
        return float(theta @ f_mean - top - np.log(np.exp(logits - top).mean()) - 0.5 * DIHEDRAL_RIDGE * theta @ theta)

    theta = np.zeros(2 * n_terms)
    for _ in range(100):
        logits = grid @ theta
        p = np.exp(logits - logits.max())
        p /= p.sum()
        mean = p @ grid
        gradient = f_mean - mean - DIHEDRAL_RIDGE * theta
        if np.abs(gradient).max() < 1e-10:
            break
        hessian = (grid * p[:, None]).T @ grid - np.outer(mean, mean) + DIHEDRAL_RIDGE * np.eye(len(theta))
        step = np.linalg.solve(hessian, gradient)
        current, t = objective(theta), 1.0
        while objective(theta + t * step) < current and t > 1e-8:  # damped Newton
            t *= 0.5
        theta = theta + t * step
    return theta


#: Prior registry: name → class. Every class takes ``(graph, **options)``.
PRIORS: dict[str, type[nn.Module]] = {"bonds": HarmonicBonds, "angles": HarmonicAngles, "repulsion": Repulsion,
                                      "dihedrals": FourierDihedrals}


def build_prior(name: str, graph: BeadGraph, options: dict[str, Any] | None = None) -> nn.Module:
    """The prior ``name`` of :data:`PRIORS` on ``graph``.

    Raises:
        ValueError: unknown name or option (the message lists the valid ones).
    """
    if name not in PRIORS:
        raise FlowforceError(f"unknown prior {name!r}; valid priors: {', '.join(PRIORS)}")
    cls = PRIORS[name]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "graph")]
    unknown = sorted(set(options or {}) - set(valid))
    if unknown:
        raise FlowforceError(f"unknown option(s) {', '.join(unknown)} for prior {name!r}; valid: "
                             f"{', '.join(valid) or 'none'}")
    return cls(graph, **(options or {}))
