r"""Free-energy surfaces along collective variables, and divergences between two ensembles.

Collective variables (CVs) are named ``KIND:i,j,...`` with bead (or atom) indices, looked up in
:data:`CV_KINDS`:

* ``dihedral:i,j,k,l`` — the IUPAC dihedral i–j–k–l (mdtraj's sign), degrees in [−180, 180);
  for the 5 backbone beads of alanine dipeptide, φ = ``dihedral:0,1,2,3`` and
  ψ = ``dihedral:1,2,3,4`` (:data:`PHI_PSI`);
* ``distance:i,j`` — ``|x_j − x_i|`` in nm.

Histograms (:func:`histogram_grid`): one or two CVs, ``bins`` bins per CV; a dihedral always
spans [−180°, 180°); a distance spans the range of *both* ensembles together, widened by 5 %
on each side. Both ensembles use the same grid.

Divergences (:func:`divergences`). Bin counts ``n_b`` become probabilities with a pseudocount
α added to every bin, ``p_b = (n_b + α) / (N + α B)`` (default α = 0.1 counts), so every bin has
``p_b > 0`` and the KL divergence is finite; α is small next to the counts of populated bins
for runs of thousands of frames, and KL (not JS) is sensitive to it through the sparse tails. Then, in nats,

    KL(P‖Q) = Σ_b p_b log(p_b / q_b),      JS(P, Q) = ½ KL(P‖M) + ½ KL(Q‖M),  M = ½(P + Q),

with P the reference and Q the model; JS ∈ [0, log 2], and JS(P, P) = 0 exactly. No other
smoothing. The free energy per bin is ``F_b = −log p_b`` in kT, shifted so its minimum is 0;
the plots mask bins without any count (they would show only the pseudocount).

These are the comparisons of Köhler, Chen, Krämer, Clementi, Noé, JCTC 2023 (arXiv:2203.11167).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import BadFileError, FlowforceError

__all__ = ["CV", "CV_KINDS", "DEFAULT_PSEUDOCOUNT", "PHI_PSI", "FESComparison", "compare_fes",
           "compute_cvs", "divergences", "histogram_grid", "parse_cv", "plot_fes"]

DEFAULT_PSEUDOCOUNT = 0.1
DEFAULT_BINS = 36
#: φ and ψ of alanine dipeptide's 5 backbone beads (ACE:C, ALA:N, ALA:CA, ALA:C, NME:N).
PHI_PSI = ("dihedral:0,1,2,3", "dihedral:1,2,3,4")
DISTANCE_MARGIN = 0.05


def _dihedral_deg(x: np.ndarray, idx: Sequence[int]) -> np.ndarray:
    i, j, k, l = idx
    b0, b1, b2 = x[:, i] - x[:, j], x[:, k] - x[:, j], x[:, l] - x[:, k]
    axis = b1 / np.linalg.norm(b1, axis=-1, keepdims=True)
    v = b0 - (b0 * axis).sum(-1, keepdims=True) * axis
    w = b2 - (b2 * axis).sum(-1, keepdims=True) * axis
    angle = np.degrees(np.arctan2((np.cross(axis, v) * w).sum(-1), (v * w).sum(-1)))
    return np.where(angle >= 180.0, angle - 360.0, angle)


def _distance_nm(x: np.ndarray, idx: Sequence[int]) -> np.ndarray:
    return np.linalg.norm(x[:, idx[1]] - x[:, idx[0]], axis=-1)


@dataclass(frozen=True)
class CVKind:
    """One kind of CV: how many indices, its function ``(T, n, 3) nm -> (T,)``, unit, periodicity."""

    n_indices: int
    function: Callable[[np.ndarray, Sequence[int]], np.ndarray]
    unit: str
    periodic: bool


#: CV kind name → :class:`CVKind`.
CV_KINDS: dict[str, CVKind] = {
    "dihedral": CVKind(4, _dihedral_deg, "deg", True),
    "distance": CVKind(2, _distance_nm, "nm", False),
}


@dataclass(frozen=True)
class CV:
    """A parsed CV: ``kind`` (a key of :data:`CV_KINDS`) and bead ``indices``."""

    kind: str
    indices: tuple[int, ...]

    @property
    def spec(self) -> str:
        return f"{self.kind}:{','.join(map(str, self.indices))}"

    @property
    def label(self) -> str:
        unit = CV_KINDS[self.kind].unit
        name = {PHI_PSI[0]: "φ = ", PHI_PSI[1]: "ψ = "}.get(self.spec, "")
        return f"{name}{self.kind}({','.join(map(str, self.indices))}) [{'°' if unit == 'deg' else unit}]"


def parse_cv(spec: str | CV) -> CV:
    """``"dihedral:0,1,2,3"`` → :class:`CV`.

    Raises:
        ValueError: unknown kind (the message lists the valid ones), a wrong number of indices,
            indices that are not distinct non-negative integers.
    """
    if isinstance(spec, CV):
        return spec
    kind, sep, rest = str(spec).partition(":")
    if not sep or kind not in CV_KINDS:
        raise FlowforceError(f"bad CV {spec!r}: write KIND:i,j,... with KIND one of {', '.join(CV_KINDS)}, "
                             "e.g. dihedral:0,1,2,3 or distance:0,4")
    try:
        indices = tuple(int(i) for i in rest.split(","))
    except ValueError:
        raise FlowforceError(f"bad CV {spec!r}: the indices must be integers separated by commas") from None
    need = CV_KINDS[kind].n_indices
    if len(indices) != need or len(set(indices)) != need or min(indices) < 0:
        raise FlowforceError(f"bad CV {spec!r}: a {kind} needs {need} distinct non-negative bead indices")
    return CV(kind, indices)


def compute_cvs(positions: Any, cvs: Sequence[CV]) -> np.ndarray:
    """CV values ``(T, k)`` of positions ``(T, n, 3)`` nm (degrees for dihedrals, nm for distances).

    Raises:
        ValueError: an index beyond the number of beads."""
    x = np.asarray(positions, dtype=np.float64)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise FlowforceError(f"positions must have shape (T, n, 3) nm, got {x.shape}")
    for cv in cvs:
        if max(cv.indices) >= x.shape[1]:
            raise FlowforceError(f"CV {cv.spec} names bead {max(cv.indices)} but the positions have {x.shape[1]} beads")
    return np.stack([CV_KINDS[cv.kind].function(x, cv.indices) for cv in cvs], axis=1)


def histogram_grid(cvs: Sequence[CV], *values: np.ndarray, bins: int = DEFAULT_BINS) -> list[np.ndarray]:
    """Bin edges per CV shared by all ``values`` ``(T, k)`` (module docstring)."""
    edges = []
    for c, cv in enumerate(cvs):
        if CV_KINDS[cv.kind].periodic:
            edges.append(np.linspace(-180.0, 180.0, bins + 1))
        else:
            lo = min(float(v[:, c].min()) for v in values)
            hi = max(float(v[:, c].max()) for v in values)
            pad = DISTANCE_MARGIN * max(hi - lo, 1e-6)
            edges.append(np.linspace(lo - pad, hi + pad, bins + 1))
    return edges


def _probabilities(counts: np.ndarray, pseudocount: float) -> np.ndarray:
    return (counts + pseudocount) / (counts.sum() + pseudocount * counts.size)


def divergences(reference_counts: np.ndarray, model_counts: np.ndarray,
                pseudocount: float = DEFAULT_PSEUDOCOUNT) -> dict[str, float]:
    """``{"kl": KL(ref‖model), "kl_reverse": KL(model‖ref), "js": JS}`` in nats (module docstring).

    Raises:
        ValueError: different shapes, a negative pseudocount, or zero pseudocount with empty bins."""
    p_counts, q_counts = np.asarray(reference_counts, float), np.asarray(model_counts, float)
    if p_counts.shape != q_counts.shape:
        raise FlowforceError(f"histograms of different shapes {p_counts.shape} and {q_counts.shape}")
    if pseudocount < 0:
        raise FlowforceError(f"pseudocount must be ≥ 0, got {pseudocount}")
    p, q = _probabilities(p_counts, pseudocount), _probabilities(q_counts, pseudocount)

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        inside = a > 0
        if np.any(b[inside] == 0):
            return math.inf
        return float(np.sum(a[inside] * np.log(a[inside] / b[inside])))

    m = 0.5 * (p + q)
    return {"kl": kl(p, q), "kl_reverse": kl(q, p), "js": max(0.0, 0.5 * kl(p, m) + 0.5 * kl(q, m))}


@dataclass
class FESComparison:
    """Reference and model histograms on one grid, and their divergences.

    Attributes:
        cvs: the CVs; edges: bin edges per CV; reference_counts/model_counts: histograms;
        divergences: :func:`divergences`; frames: ``{"reference": T_ref, "model": T_model}``;
        pseudocount: α.
    """

    cvs: list[CV]
    edges: list[np.ndarray]
    reference_counts: np.ndarray
    model_counts: np.ndarray
    divergences: dict[str, float]
    frames: dict[str, int]
    pseudocount: float

    def free_energy(self, which: str) -> np.ndarray:
        """``−log p`` in kT, minimum 0, NaN where the histogram has no count."""
        counts = self.reference_counts if which == "reference" else self.model_counts
        f = -np.log(_probabilities(counts, self.pseudocount))
        f = f - f[counts > 0].min() if (counts > 0).any() else f
        return np.where(counts > 0, f, np.nan)

    def report(self) -> dict[str, Any]:
        """Plain data for a JSON report."""
        return {"cvs": [cv.spec for cv in self.cvs], "divergences_nats": dict(self.divergences),
                "frames": dict(self.frames),
                "grid": [{"cv": cv.spec, "unit": CV_KINDS[cv.kind].unit, "bins": len(e) - 1,
                          "low": float(e[0]), "high": float(e[-1])} for cv, e in zip(self.cvs, self.edges)],
                "pseudocount_per_bin": self.pseudocount, "smoothing": "none",
                "definitions": "p_b = (n_b + a)/(N + a B); KL(ref||model) = sum p log(p/q); "
                               "JS = (KL(p||m) + KL(q||m))/2, m = (p+q)/2; nats"}


def compare_fes(reference_positions: Any, model_positions: Any, cvs: Sequence[str | CV] = PHI_PSI,
                bins: int = DEFAULT_BINS, pseudocount: float = DEFAULT_PSEUDOCOUNT) -> FESComparison:
    """Histogram both ensembles (positions ``(T, n, 3)`` nm) along one or two CVs on one grid.

    Raises:
        ValueError: not one or two CVs, bad CV specs, fewer than 2 bins, empty ensembles."""
    parsed = [parse_cv(c) for c in cvs]
    if not 1 <= len(parsed) <= 2:
        raise FlowforceError(f"give one or two CVs for a free-energy surface, got {len(parsed)}")
    if int(bins) < 2:
        raise FlowforceError(f"bins must be at least 2, got {bins}")
    ref, mod = compute_cvs(reference_positions, parsed), compute_cvs(model_positions, parsed)
    if len(ref) == 0 or len(mod) == 0:
        raise FlowforceError("both ensembles need at least one frame")
    edges = histogram_grid(parsed, ref, mod, bins=int(bins))
    ref_counts = np.histogramdd(ref, bins=edges)[0]
    mod_counts = np.histogramdd(mod, bins=edges)[0]
    return FESComparison(parsed, edges, ref_counts, mod_counts, divergences(ref_counts, mod_counts, pseudocount),
                         {"reference": int(len(ref)), "model": int(len(mod))}, float(pseudocount))


def plot_fes(comparison: FESComparison, path: str | Path, titles: Sequence[str] = ("reference", "model")) -> Path:
    """PNG with reference | model | difference (model − reference), free energies in kT.

    Written atomically (matplotlib's Agg backend, no display needed)."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..io import atomic_write_bytes

    f_ref, f_mod = comparison.free_energy("reference"), comparison.free_energy("model")
    diff = f_mod - f_ref
    js = comparison.divergences["js"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), constrained_layout=True)
    panels = [(f_ref, titles[0], "viridis"), (f_mod, titles[1], "viridis"), (diff, "difference: model − reference", "RdBu_r")]
    edges = comparison.edges
    finite = np.concatenate([f[np.isfinite(f)] for f in (f_ref, f_mod)]) if np.isfinite(f_ref).any() else np.zeros(1)
    vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
    dmax = float(np.nanpercentile(np.abs(diff), 95)) if np.isfinite(diff).any() else 1.0
    for ax, (values, title, cmap) in zip(axes, panels):
        if len(edges) == 2:
            limits = dict(vmin=-dmax, vmax=dmax) if cmap == "RdBu_r" else dict(vmin=0.0, vmax=vmax)
            mesh = ax.pcolormesh(edges[0], edges[1], values.T, cmap=cmap, shading="flat", **limits)
            fig.colorbar(mesh, ax=ax, label="ΔF [kT]" if cmap == "RdBu_r" else "F [kT]")
            ax.set_ylabel(comparison.cvs[1].label)
        else:
            centres = 0.5 * (edges[0][1:] + edges[0][:-1])
            ax.plot(centres, values, "o-", ms=3)
            ax.set_ylabel("ΔF [kT]" if cmap == "RdBu_r" else "F [kT]")
        ax.set_xlabel(comparison.cvs[0].label)
        for e, setter in zip(edges, (ax.set_xticks, ax.set_yticks)):
            if e[0] == -180.0 and e[-1] == 180.0:
                setter(np.arange(-180, 181, 90))
        ax.set_title(title)
    fig.suptitle(f"JS = {js:.4f} nats, KL(ref‖model) = {comparison.divergences['kl']:.4f} nats "
                 f"({comparison.frames['reference']} reference / {comparison.frames['model']} model frames, "
                 f"pseudocount {comparison.pseudocount:g} per bin)")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def load_trajectory_positions(trajectory: str | Path, topology: str | Path, skip: int = 0) -> np.ndarray:
    """Positions ``(T, n, 3)`` nm of a trajectory (DCD, XTC, ... anything mdtraj reads) with its
    PDB topology, without the first ``skip`` frames.

    Raises:
        FileNotFoundError: a missing file. ValueError: unreadable files or no frames left."""
    import mdtraj

    from ..io import require_input_file, silenced_native_stdout

    require_input_file(trajectory, "a trajectory (DCD, XTC, ... as mdtraj reads)", "flowforce simulate writes one")
    require_input_file(topology, "a PDB topology", "flowforce cg writes CG.pdb next to the model")
    try:
        with silenced_native_stdout():  # the DCD plugin prints to fd 1
            traj = mdtraj.load(str(trajectory), top=str(topology))
    except Exception as error:  # mdtraj raises several types for bad or mismatched files
        raise BadFileError(f"cannot read {trajectory} with topology {topology} ({type(error).__name__}: "
                           f"{' '.join(str(error).split())[:300]}); they should be a trajectory and the PDB of the "
                           "same molecule") from None
    if skip < 0 or skip >= traj.n_frames:
        raise FlowforceError(f"skip={skip} leaves no frames of the {traj.n_frames} in {trajectory}")
    return np.asarray(traj.xyz[skip:], dtype=np.float64)


def mapped_reference_positions(data: Any, mapping: str = "backbone") -> np.ndarray:
    """CG positions ``(T, n, 3)`` nm of a dataset (a ``.npz`` path or a loaded
    :class:`~openmm_flowforce.data.dataset.Dataset`), mapped with a preset."""
    from ..coordinates.cg_mapping import CGMapping
    from ..data.dataset import Dataset, load_dataset

    dataset = data if isinstance(data, Dataset) else load_dataset(data)
    cg = CGMapping.from_topology(dataset.topology, mapping)
    return np.asarray(cg.map_positions(dataset.positions.astype(np.float64)))
