"""Z-matrix orderings built automatically from a bond graph (pure Python + NumPy).

A Z-matrix places atoms one after another. Row ``p`` of :attr:`ZMatrix.rows` is
``(i, j, k, l)``: atom ``i`` is placed at distance ``|x_i − x_j|`` (its bond) from ``j``,
with the angle ``i–j–k`` and the torsion ``i–j–k–l``; ``j, k, l`` were placed before ``i``
and ``−1`` marks a reference that row does not have:

* row 0, the root: ``(i, −1, −1, −1)``, no coordinates;
* row 1: ``(i, j, −1, −1)``, a bond;
* row 2: ``(i, j, k, −1)``, a bond and an angle;
* rows ≥ 3: a bond, an angle and a torsion,

so a molecule of N atoms has (N−1) + (N−2) + (N−3) = 3N − 6 internal coordinates.

How the ordering is chosen:

* the root is a heavy atom near the centre of the bond graph (the middle of a longest
  shortest path, found with two breadth-first sweeps), which keeps placement chains short;
* atoms are then placed breadth first from the root, heavy atoms before hydrogens and
  hydrogens before element-less particles, so hydrogens hang off a heavy-atom skeleton;
* ``j`` is always bonded to ``i`` and ``k`` always bonded to ``j`` (every placed atom other
  than the root has a placed neighbour, and the root's first neighbour is row 1), so every
  angle is a true bond angle; ``l`` is another placed neighbour of ``j`` where there is one
  (the torsion of ``i`` relative to a sibling: for a methyl's second and third hydrogens
  ≈ ±120°, narrow, so the rotation of the group is carried by its first atom alone and the
  flow need not learn three tightly correlated circles), else an atom bonded to ``k`` (a
  proper torsion), else the earliest other placed atom. Among candidates, heavy atoms and then
  the earliest placed are preferred.
"""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from ..errors import FlowforceError

__all__ = ["ZMatrix", "build_zmatrix"]

#: Element symbols treated as hydrogen (lower placement/reference priority).
HYDROGEN_SYMBOLS = frozenset({"H", "D", "T"})


@dataclass(frozen=True)
class ZMatrix:
    """A placement order with reference atoms.

    Attributes:
        rows: ``(N, 4)`` int64, row ``p`` = ``(i, j, k, l)`` in topology atom indices, ``−1``
            where a reference is absent (see the module docstring).
    """

    rows: np.ndarray

    @property
    def n_atoms(self) -> int:
        return int(self.rows.shape[0])

    @property
    def order(self) -> np.ndarray:
        """``(N,)`` atom indices in placement order."""
        return self.rows[:, 0]


def _priority(elements: Sequence[str | None] | None, n_atoms: int) -> np.ndarray:
    """0 for heavy atoms, 1 for hydrogens, 2 for particles without an element."""
    if elements is None:
        return np.zeros(n_atoms, dtype=np.int64)
    if len(elements) != n_atoms:
        raise FlowforceError(f"got {len(elements)} element symbols for {n_atoms} atoms")
    out = np.zeros(n_atoms, dtype=np.int64)
    for a, sym in enumerate(elements):
        if sym is None or sym in ("", "VS"):
            out[a] = 2
        elif sym.capitalize() in HYDROGEN_SYMBOLS:
            out[a] = 1
    return out


def _adjacency(n_atoms: int, bonds: Iterable[tuple[int, int]]) -> list[list[int]]:
    neighbours: list[set[int]] = [set() for _ in range(n_atoms)]
    for bond in bonds:
        a, b = (int(v) for v in bond)
        if not (0 <= a < n_atoms and 0 <= b < n_atoms):
            raise FlowforceError(f"bond ({a}, {b}) refers to an atom outside 0..{n_atoms - 1}")
        if a == b:
            raise FlowforceError(f"bond ({a}, {b}) joins atom {a} to itself")
        neighbours[a].add(b)
        neighbours[b].add(a)
    return [sorted(s) for s in neighbours]


def _bfs_distances(adj: list[list[int]], start: int) -> np.ndarray:
    dist = np.full(len(adj), -1, dtype=np.int64)
    dist[start] = 0
    queue = deque([start])
    while queue:
        a = queue.popleft()
        for b in adj[a]:
            if dist[b] < 0:
                dist[b] = dist[a] + 1
                queue.append(b)
    return dist


def _check_connected(adj: list[list[int]], labels: Sequence[str] | None) -> None:
    n = len(adj)
    component = np.full(n, -1, dtype=np.int64)
    fragments: list[np.ndarray] = []
    for a in range(n):
        if component[a] < 0:
            members = np.flatnonzero(_bfs_distances(adj, a) >= 0)
            component[members] = len(fragments)
            fragments.append(members)
    if len(fragments) == 1:
        return

    def describe(members: np.ndarray) -> str:
        shown = [labels[m] if labels is not None else str(m) for m in members[:4]]
        more = ", ..." if len(members) > 4 else ""
        return f"{len(members)} atoms [{', '.join(shown)}{more}]"

    listed = "; ".join(f"fragment {f}: {describe(m)}" for f, m in enumerate(fragments[:6]))
    if len(fragments) > 6:
        listed += f"; ... and {len(fragments) - 6} more fragments"
    raise FlowforceError(
        f"the bond graph is not connected: it has {len(fragments)} fragments ({listed}). "
        "Internal coordinates need one connected molecule: build one InternalCoordinates per "
        "molecule (e.g. select it with mdtraj's topology.select / atom_slice, or delete water "
        "and ions with openmm.app.Modeller), or add the missing bonds to the topology."
    )


def _choose_root(adj: list[list[int]], priority: np.ndarray) -> int:
    """A heavy atom near the graph centre: the middle of a longest path (double BFS sweep)."""
    start = int(np.argmin(priority))  # first heavy atom, if any
    far = int(np.argmax(_bfs_distances(adj, start)))
    dist_far = _bfs_distances(adj, far)
    other = int(np.argmax(dist_far))
    dist_other = _bfs_distances(adj, other)
    length = int(dist_far[other])
    # Atoms on a shortest far–other path at its midpoint; ties broken by priority, index.
    on_path = np.flatnonzero(dist_far + dist_other == length)
    centre_score = np.abs(2 * dist_far[on_path] - length)
    best = on_path[np.lexsort((on_path, priority[on_path], centre_score))[0]]
    if priority[best] > priority.min():
        # The midpoint is a hydrogen (tiny molecules): take its best-priority neighbour.
        best = min(adj[best], key=lambda b: (priority[b], b))
    return int(best)


def _pick(candidates: Iterable[int], position: np.ndarray, priority: np.ndarray) -> int:
    """Heavy before light, then earliest placed; −1 when there is no candidate."""
    best = min(candidates, key=lambda a: (priority[a], position[a]), default=-1)
    return int(best)


def build_zmatrix(
    n_atoms: int,
    bonds: Iterable[tuple[int, int]],
    elements: Sequence[str | None] | None = None,
    labels: Sequence[str] | None = None,
) -> ZMatrix:
    """Build a Z-matrix for one connected molecule from its bond graph.

    Args:
        n_atoms: number of atoms N (at least 3).
        bonds: pairs of atom indices in ``0..N−1``; duplicates and order do not matter.
        elements: element symbol per atom (``"C"``, ``"H"``, ``None`` for virtual sites);
            used to prefer heavy atoms as root and references. ``None``: all treated alike.
        labels: a name per atom (e.g. ``"ALA2:CA"``), used only in error messages.

    Returns:
        The :class:`ZMatrix`; see the module docstring for the choice of references.

    Raises:
        ValueError: if N < 3, a bond refers to a missing atom, or the bond graph is not
            connected (the message names the fragments).
    """
    n_atoms = int(n_atoms)
    if n_atoms < 3:
        raise FlowforceError(
            f"internal coordinates need at least 3 atoms (3N − 6 > 0), got {n_atoms}; "
            "for one or two atoms use Cartesian coordinates"
        )
    if labels is not None and len(labels) != n_atoms:
        raise FlowforceError(f"got {len(labels)} atom labels for {n_atoms} atoms")
    adj = _adjacency(n_atoms, bonds)
    priority = _priority(elements, n_atoms)
    _check_connected(adj, labels)

    root = _choose_root(adj, priority)
    position = np.full(n_atoms, n_atoms, dtype=np.int64)  # placement index; N = not yet
    rows = np.full((n_atoms, 4), -1, dtype=np.int64)
    # Breadth-first by (priority, discovery order): heavy skeleton first, then hydrogens.
    discovered = np.full(n_atoms, -1, dtype=np.int64)
    discovered[root] = 0
    n_discovered = 1
    frontier: list[tuple[int, int, int]] = [(int(priority[root]), 0, root)]
    for p in range(n_atoms):
        _, _, i = heapq.heappop(frontier)
        position[i] = p
        placed_neighbours = [a for a in adj[i] if position[a] < p]
        j = _pick(placed_neighbours, position, priority)
        k = _pick((a for a in adj[j] if position[a] < p and a != i), position, priority) if p >= 2 else -1
        l = -1
        if p >= 3:
            used = {i, j, k}
            # A placed sibling on j first: then only the first atom placed on (j, k) carries
            # the rotation about j–k, and its siblings' torsions are relative to it (narrow).
            l = _pick((a for a in adj[j] if position[a] < p and a not in used), position, priority)
            if l < 0:
                l = _pick((a for a in adj[k] if position[a] < p and a not in used), position, priority)
            if l < 0:
                l = _pick((a for a in range(n_atoms) if position[a] < p and a not in used), position, priority)
        rows[p] = (i, j, k, l)
        for b in adj[i]:
            if discovered[b] < 0:
                discovered[b] = n_discovered
                heapq.heappush(frontier, (int(priority[b]), n_discovered, b))
                n_discovered += 1
    assert (rows[1:, 1] >= 0).all() and (rows[2:, 2] >= 0).all() and (rows[3:, 3] >= 0).all()
    return ZMatrix(rows=rows)
