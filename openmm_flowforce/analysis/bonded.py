"""Do a CG model's bonds and angles look like the reference's?

A good φ/ψ surface with broken bonds is not a good model, so every CG evaluation also
compares the one-dimensional distributions of each bonded term of the CG molecule: the
length of every bond (nm) and every bond angle (degrees, in [0, 180]). The distance between
two such distributions is the Wasserstein-1 distance (earth mover's distance), which keeps
the unit of the term: W1 = 0.002 nm means the model's bond lengths are, on average, moved by
2 pm from the reference's; for two distributions that differ only by a shift δ, W1 = |δ|.
``scipy.stats.wasserstein_distance`` computes it exactly from the samples (sorted CDFs).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import FlowforceError
from ..potentials.priors import BeadGraph

__all__ = ["bonded_terms", "bonds_of_pdb", "compare_bonded", "summary_line"]


def bonded_terms(positions: Any, graph: BeadGraph) -> dict[str, np.ndarray]:
    """Bond lengths (nm) and bond angles (degrees) of every frame.

    Args:
        positions: ``(T, n, 3)`` bead positions, nm.
        graph: the CG molecule's bonds (angles are derived from them).

    Returns:
        ``{"bond i-j": (T,), ..., "angle i-j-k": (T,), ...}``.
    """
    x = np.asarray(positions, dtype=np.float64)
    if x.ndim != 3 or x.shape[1:] != (graph.n_beads, 3):
        raise FlowforceError(f"positions must be (frames, {graph.n_beads}, 3) for this CG molecule, got {x.shape}")
    terms: dict[str, np.ndarray] = {}
    for i, j in graph.bonds:
        terms[f"bond {i}-{j}"] = np.linalg.norm(x[:, j] - x[:, i], axis=-1)
    for i, j, k in graph.angles:
        a, b = x[:, i] - x[:, j], x[:, k] - x[:, j]
        cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        terms[f"angle {i}-{j}-{k}"] = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    return terms


def compare_bonded(reference_positions: Any, model_positions: Any, bonds: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Wasserstein-1 distance of every bond length and bond angle distribution (module docstring).

    Args:
        reference_positions, model_positions: ``(T, n, 3)`` nm (any numbers of frames).
        bonds: the CG bonds ``(i, j)``.

    Returns:
        ``{"w1": {term: W1}, "units": ..., "bonds_w1_max_nm", "angles_w1_max_deg",
        "bonds_w1_mean_nm", "angles_w1_mean_deg"}`` (the maxima name the worst term).
    """
    from scipy.stats import wasserstein_distance

    reference = np.asarray(reference_positions)
    graph = BeadGraph.from_bonds(reference.shape[1] if reference.ndim == 3 else 0, bonds)
    ref_terms, model_terms = bonded_terms(reference, graph), bonded_terms(model_positions, graph)
    w1 = {name: float(wasserstein_distance(ref_terms[name], model_terms[name])) for name in ref_terms}
    report: dict[str, Any] = {"w1": w1, "units": "bonds nm, angles degrees"}
    for kind, unit in (("bond", "nm"), ("angle", "deg")):
        values = {name: value for name, value in w1.items() if name.startswith(kind)}
        if values:
            worst = max(values, key=values.get)
            report[f"{kind}s_w1_max_{unit}"] = values[worst]
            report[f"{kind}s_w1_worst"] = worst
            report[f"{kind}s_w1_mean_{unit}"] = float(np.mean(list(values.values())))
    return report


def bonds_of_pdb(path: Any) -> list[tuple[int, int]]:
    """The bonds ``(i, j)``, ``i < j``, sorted, of a CG PDB written by ``flowforce cg`` (its CONECT records)."""
    from openmm.app import PDBFile

    return sorted((min(a.index, b.index), max(a.index, b.index)) for a, b in PDBFile(str(path)).topology.bonds())


def summary_line(report: dict[str, Any]) -> str:
    """One line for the terminal: the worst bond and angle W1."""
    parts = [f"worst bond W1 {report['bonds_w1_max_nm'] * 1000:.1f} pm ({report['bonds_w1_worst']})"
             if "bonds_w1_max_nm" in report else "",
             f"worst angle W1 {report['angles_w1_max_deg']:.2f} deg ({report['angles_w1_worst']})"
             if "angles_w1_max_deg" in report else ""]
    return ", ".join(p for p in parts if p) or "no bonds"
