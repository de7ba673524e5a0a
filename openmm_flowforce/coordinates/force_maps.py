r"""Force maps for force matching: which combination of all-atom forces estimates a bead's mean force.

Force matching fits a CG net to mapped forces ``F_I = Σ_i W_Ii f_i``. For a linear configurational
map ``X = C x`` (``C``: ``n_beads × n_atoms``, :class:`~openmm_flowforce.coordinates.cg_mapping.CGMapping`),
any constant ``W`` with

    C Wᵀ = I        (Σ_i W_Ii C_Ji = δ_IJ)

gives a mapped force whose mean at fixed bead positions is the mean force −∇A(X), so force
matching converges to the same potential of mean force whatever ``W`` is (Ciccotti, Kapral,
Vanden-Eijnden, ChemPhysChem 6, 1809 (2005); Noid et al., J. Chem. Phys. 128, 244114 (2008)).
``W`` does change the *noise* about that mean, and with it how many frames force matching
needs. Two maps, :data:`FORCE_MAPS`:

* ``basic``: the mapping's own, ``F_I = Σ_{i∈G_I} f_i`` (the force on a slice bead's atom);
* ``optimal``: the ``W`` of least mean square mapped force, ``min E_t ‖W f_t‖²`` subject to
  ``C Wᵀ = I``, fitted to the training frames in closed form (below). Since the mean force
  is the same for every valid ``W``, minimising the second moment minimises the noise: the
  statistically optimal force aggregation of Krämer, Durumeric, Charron, Chen, Clementi,
  Noé, de Fabritiis (J. Phys. Chem. Lett. 14, 3970 (2023), arXiv:2302.07071). On the
  alanine-dipeptide backbone map it halves the noise of the torsional generalised forces
  (BENCHMARKS "Optimal force maps").

Constraints. With bond constraints (``HBonds``, HMR data) OpenMM's forces omit the constraint
forces ``±g`` on each constrained pair. A map that gives both atoms of a pair the same
weight in every bead is blind to them, so the recorded forces are as good as the full ones;
the basic map of a slice bead constrained to an unmapped hydrogen is not, and is biased.
The optimal map is therefore solved over *constraint groups* (connected components of the
constraint graph), every atom of a group sharing its weights.

The solution. With ``A`` the ``n_atoms × n_groups`` membership matrix, ``S = Aᵀ (E_t Σ_c f_tc f_tcᵀ) A``
(``c`` the Cartesian component) and ``C' = C A``, each bead's group weights solve
``min uᵀ S u`` subject to ``C' u = e_I``. Every solution is ``u = u₀ + N z`` with the particular
``U₀ = (C'C'ᵀ)⁻¹ C'`` and ``N`` a basis of the null space of ``C'``, so

    z = −(Nᵀ S N)⁺ Nᵀ S u₀        (least squares: ``S`` may be singular),

which keeps ``C Wᵀ = I`` to rounding however ill-conditioned ``S`` is (the forces of an
isolated molecule sum to zero; a map can be noise-free along some directions).
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import FlowforceError

__all__ = ["FORCE_MAPS", "constraint_groups", "optimal_force_map", "system_constraints"]

#: ``force_map`` choices of ``flowforce cg --method force-matching``.
FORCE_MAPS = ("basic", "optimal")


def system_constraints(system: Any) -> list[tuple[int, int]]:
    """The constrained atom pairs of an ``openmm.System``."""
    return [tuple(int(a) for a in system.getConstraintParameters(k)[:2]) for k in range(system.getNumConstraints())]


def constraint_groups(n_atoms: int, constraints: Iterable[Sequence[int]] = ()) -> np.ndarray:
    """Label of each atom's constraint group (connected component of the constraint graph),
    ``(n_atoms,)`` int, labels ``0 .. n_groups − 1`` in order of first atom."""
    parent = list(range(n_atoms))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for pair in constraints:
        i, j = (int(a) for a in pair)
        if not (0 <= i < n_atoms and 0 <= j < n_atoms):
            raise FlowforceError(f"constraint ({i}, {j}) names an atom outside [0, {n_atoms}); the constraints "
                                 "must come from the System the forces were recorded with")
        parent[root(i)] = root(j)
    roots = [root(i) for i in range(n_atoms)]
    first: dict[int, int] = {}
    return np.array([first.setdefault(r, len(first)) for r in roots], dtype=np.int64)


def optimal_force_map(forces: Any, position_matrix: np.ndarray, constraints: Iterable[Sequence[int]] = ()) -> np.ndarray:
    """The force map ``W`` of least mean square mapped force with ``C Wᵀ = I`` (module docstring).

    Args:
        forces: all-atom forces of the frames to fit to, ``(T, n_atoms, 3)`` kJ/mol/nm.
        position_matrix: ``C``, ``(n_beads, n_atoms)``: bead positions ``X = C x``.
        constraints: constrained atom pairs of the System the forces came from (their atoms
            get equal weights, so the missing constraint forces cancel).

    Returns:
        ``W``, ``(n_beads, n_atoms)`` float64: mapped forces are ``einsum("Ia,tac->tIc", W, f)``.

    Raises:
        FlowforceError: shapes that do not match, non-finite forces, or a constraint group that
            holds atoms of two beads' positions (no map can then be blind to its constraint
            forces and valid; map the whole group into one bead).
    """
    f = np.asarray(forces, dtype=np.float64)
    c = np.asarray(position_matrix, dtype=np.float64)
    if f.ndim != 3 or c.ndim != 2 or f.shape[1:] != (c.shape[1], 3) or len(f) == 0:
        raise FlowforceError(f"forces {f.shape} must be (T >= 1, {c.shape[-1]}, 3) for a mapping of "
                             f"{c.shape[-1]} atoms")
    if not np.isfinite(f).all():
        raise FlowforceError("the forces hold NaN or infinite values; the optimal force map needs finite forces")
    labels = constraint_groups(c.shape[1], constraints)
    members = np.zeros((c.shape[1], labels.max() + 1))
    members[np.arange(c.shape[1]), labels] = 1.0
    c_groups = c @ members
    shared = np.flatnonzero((np.abs(c_groups) > 0).sum(axis=0) > 1)
    if len(shared):
        atoms = np.flatnonzero(labels == shared[0]).tolist()
        raise FlowforceError(f"atoms {atoms} are joined by constraints but lie in the positions of several beads; "
                             "map each constrained cluster into one bead, or record forces without constraints")
    grouped = np.einsum("tac,ag->tgc", f, members)
    s = np.einsum("tgc,thc->gh", grouped, grouped) / len(f)
    particular = np.linalg.solve(c_groups @ c_groups.T, c_groups)  # (n_beads, n_groups), C' U₀ᵀ = I
    _, singular, vt = np.linalg.svd(c_groups)
    null = vt[int((singular > 1e-12 * singular.max()).sum()):].T  # (n_groups, n_free)
    if null.shape[1]:
        z = -np.linalg.lstsq(null.T @ s @ null, null.T @ s @ particular.T, rcond=None)[0]
        particular = particular + (null @ z).T
    return particular @ members.T
