"""Internal coordinates built from a topology's bond graph.

* :class:`InternalCoordinates` — Cartesian (nm) ↔ bonds/angles/torsions ↔ unit cube, with
  exact log-determinants (``to_unit`` / ``from_unit``); built with
  ``InternalCoordinates.from_topology(topology, positions)``.
* :func:`build_zmatrix` / :class:`ZMatrix` — the automatic Z-matrix ordering behind it.
"""
from .internal import InternalCoordinates
from .zmatrix import ZMatrix, build_zmatrix

__all__ = ["InternalCoordinates", "ZMatrix", "build_zmatrix"]
