r"""Evaluation of a protein model against reference MD: folding, kinetics and free-energy
surfaces on the Cα level.

:func:`evaluate_protein` takes the Cα frames of a reference ensemble (all-atom MD mapped to
Cα) and of a model (a CG trajectory or samples), and the folded structure, and computes for
each ensemble

* Q, the fraction of native Cα contacts (:mod:`.protein`, BHE 2013), and the Cα-RMSD to the
  folded structure (nm);
* the transition-based two-state assignment on Q, the folded fraction with its standard
  error, and the number of folding and unfolding events (:mod:`.kinetics`);
* the projection on the first two TICs of a deeptime TICA fitted on the *reference* only.

TICA features: inverse Cα–Cα distances 1/r_ij for |i − j| ≥ 3. Inverse rather than plain
distances because folding is the formation of contacts: 1/r changes most where residues
touch and hardly at all between two unfolded conformations whose far-apart residues move by
nanometres, so the linear TICA model sees the folding coordinate instead of the large, fast
fluctuations of the unfolded chain. Pairs |i − j| < 3 are left out: in a Cα chain they are
the bonds and bond angles, fast and nearly constant, which add noise and near-singular
directions to the covariance but no slow information.

Free-energy surfaces on (TIC1, TIC2) and (Q, RMSD) on bins shared by both ensembles (Q on
[0, 1]; RMSD on [0, 1.05 × the largest]; TICs over both ranges widened by 5 %), compared with
the divergences of :func:`.fes.divergences` (JS, KL both ways, nats, with the pseudocount).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FlowforceError
from .fes import DEFAULT_PSEUDOCOUNT, DISTANCE_MARGIN, FESComparison, divergences, plot_fes
from .kinetics import (FOLDED, UNFOLDED, FoldedFraction, TICAResult, count_events, fit_tica, folded_fraction,
                       replica_segments, transition_based_assignment)
from .protein import (BETA_PER_NM, CONTACT_DEFINITIONS, NativeContacts, ca_rmsd, fraction_native_contacts,
                      native_contacts)
from .protein_frames import ProteinFrames, heavy_atoms

__all__ = ["Axis", "EnsembleResult", "ProteinEvaluation", "ProteinOptions", "evaluate_protein",
           "inverse_distance_features", "plot_protein", "surface_comparison"]

#: Sequence separation of the Cα pairs used as TICA features (module docstring).
FEATURE_MIN_SEPARATION = 3


@dataclass(frozen=True)
class ProteinOptions:
    """Settings of :func:`evaluate_protein`.

    Attributes:
        q_unfolded, q_folded: core thresholds on Q (folded core Q ≥ q_folded).
        tica_lag: τ in reference frames; n_blocks: time blocks for the error without replicas;
        bins: per axis of both surfaces; pseudocount: per bin (:func:`.fes.divergences`).
    """

    q_unfolded: float = 0.3
    q_folded: float = 0.7
    tica_lag: int = 10
    n_blocks: int = 10
    bins: int = 30
    pseudocount: float = DEFAULT_PSEUDOCOUNT


@dataclass(frozen=True)
class Axis:
    """An axis of a surface: what :func:`.fes.plot_fes` needs of a CV (``spec`` and ``label``)."""

    spec: str
    label: str


@dataclass
class EnsembleResult:
    """Per-frame order parameters and two-state statistics of one ensemble."""

    frames: ProteinFrames
    q: np.ndarray
    rmsd_nm: np.ndarray
    states: np.ndarray
    events: dict[str, int]
    fraction: FoldedFraction
    tics: np.ndarray
    q_heavy_atom: np.ndarray | None = None

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": self.frames.source, "frames": self.frames.n_frames,
            "replicas": None if self.frames.replica is None else int(len(np.unique(self.frames.replica))),
            "frame_ps": self.frames.frame_ps,
            "q_mean": float(self.q.mean()), "rmsd_nm_mean": float(self.rmsd_nm.mean()),
            "rmsd_nm_min": float(self.rmsd_nm.min()),
            "folded_fraction": self.fraction.report(), "events": dict(self.events)}
        if self.q_heavy_atom is not None:
            out["q_heavy_atom_mean"] = float(self.q_heavy_atom.mean())
        return out


@dataclass
class ProteinEvaluation:
    """Everything :func:`evaluate_protein` computed; :meth:`report` is the JSON report."""

    options: ProteinOptions
    contacts: NativeContacts
    folded_source: str
    tica: TICAResult
    reference: EnsembleResult
    model: EnsembleResult
    surfaces: dict[str, FESComparison] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        o = self.options
        frame_ps = self.reference.frames.frame_ps
        definition = CONTACT_DEFINITIONS[self.contacts.definition]
        return {
            "kind": "protein", "folded": self.folded_source, "n_ca": int(self.reference.frames.ca.shape[1]),
            "native_contacts": {"definition": self.contacts.definition, "count": self.contacts.n_contacts,
                                "cutoff_nm": definition.cutoff_nm, "min_residue_separation": definition.min_separation + 1,
                                "tolerance_lambda": definition.tolerance, "beta_per_nm": BETA_PER_NM,
                                "pairs": self.contacts.pairs.tolist()},
            "states": {"order_parameter": "Q", "unfolded_core": f"Q <= {o.q_unfolded}",
                       "folded_core": f"Q >= {o.q_folded}",
                       "assignment": "transition-based: each frame takes the last core visited; frames before the "
                                     "first core visit are unassigned; events need a visit to the other core"},
            "ensembles": {"reference": self.reference.report(), "model": self.model.report()},
            "tica": {"package": "deeptime.decomposition.TICA", "fitted_on": "reference",
                     "features": f"inverse Ca-Ca distances 1/r_ij, |i-j| >= {FEATURE_MIN_SEPARATION}",
                     "n_features": int(self.tica.model.cov_00.shape[0]), "lagtime_frames": self.tica.lagtime,
                     "eigenvalues": self.tica.eigenvalues.tolist(),
                     "timescales_frames": _finite_or_none(self.tica.timescales_frames),
                     "timescales_ps": None if frame_ps is None else _finite_or_none(self.tica.timescales_frames * frame_ps)},
            "surfaces": {name: _surface_report(s) for name, s in self.surfaces.items()},
            "definitions": "Q: Best, Hummer, Eaton PNAS 2013; RMSD after optimal superposition (Kabsch), nm; "
                           "divergences in nats: p_b = (n_b + a)/(N + a B), JS = (KL(p||m) + KL(q||m))/2",
        }


def _finite_or_none(values: np.ndarray) -> list[float | None]:
    """JSON has no NaN: an undefined value is null."""
    return [float(v) if np.isfinite(v) else None for v in values]


def _surface_report(s: FESComparison) -> dict[str, Any]:
    return {"axes": [a.spec for a in s.cvs], "divergences_nats": dict(s.divergences), "frames": dict(s.frames),
            "grid": [{"axis": a.spec, "bins": len(e) - 1, "low": float(e[0]), "high": float(e[-1])}
                     for a, e in zip(s.cvs, s.edges)], "pseudocount_per_bin": s.pseudocount}


def inverse_distance_features(ca: np.ndarray, min_separation: int = FEATURE_MIN_SEPARATION) -> np.ndarray:
    """TICA features ``(T, F)`` in nm⁻¹: 1/r_ij of the Cα pairs with j − i ≥ ``min_separation``."""
    i, j = np.triu_indices(ca.shape[1], k=min_separation)
    return 1.0 / np.linalg.norm(ca[:, i] - ca[:, j], axis=-1)


def _grid(reference: np.ndarray, model: np.ndarray, fixed: tuple[float, float] | None, bins: int) -> np.ndarray:
    if fixed is not None:
        return np.linspace(fixed[0], fixed[1], bins + 1)
    lo, hi = min(reference.min(), model.min()), max(reference.max(), model.max())
    pad = DISTANCE_MARGIN * max(hi - lo, 1e-6)
    return np.linspace(lo - pad, hi + pad, bins + 1)


def surface_comparison(reference: np.ndarray, model: np.ndarray, axes: tuple[Axis, Axis],
                       ranges: tuple[tuple[float, float] | None, tuple[float, float] | None] = (None, None),
                       bins: int = 30, pseudocount: float = DEFAULT_PSEUDOCOUNT) -> FESComparison:
    """Histograms of ``(T, 2)`` values of both ensembles on one grid, and their divergences.

    ``ranges`` fixes an axis's range (None: both ensembles' range widened by 5 %)."""
    if int(bins) < 2:
        raise FlowforceError(f"bins must be at least 2, got {bins}")
    edges = [_grid(reference[:, k], model[:, k], ranges[k], int(bins)) for k in range(2)]
    ref_counts = np.histogramdd(reference, bins=edges)[0]
    mod_counts = np.histogramdd(model, bins=edges)[0]
    return FESComparison(list(axes), edges, ref_counts, mod_counts, divergences(ref_counts, mod_counts, pseudocount),
                         {"reference": int(len(reference)), "model": int(len(model))}, float(pseudocount))


def _ensemble(frames: ProteinFrames, folded: ProteinFrames, contacts: NativeContacts, options: ProteinOptions,
              heavy_contacts: NativeContacts | None) -> EnsembleResult:
    q = fraction_native_contacts(frames.ca, contacts)
    rmsd = ca_rmsd(frames.ca, folded.ca[0])
    states = transition_based_assignment(q, options.q_unfolded, options.q_folded, frames.replica)
    fraction = folded_fraction(states, frames.replica, options.n_blocks)
    q_heavy = None
    heavy = heavy_atoms(frames, like=folded) if heavy_contacts is not None else None
    if heavy is not None:
        q_heavy = fraction_native_contacts(heavy[0], heavy_contacts)
    return EnsembleResult(frames, q, rmsd, states, count_events(states, frames.replica), fraction,
                          np.zeros((frames.n_frames, 2)), q_heavy)


def evaluate_protein(reference: ProteinFrames, model: ProteinFrames, folded: ProteinFrames,
                     options: ProteinOptions = ProteinOptions()) -> ProteinEvaluation:
    """Compare a model ensemble with a reference one on the Cα level (module docstring).

    Raises:
        FlowforceError: different numbers of Cα in the three inputs, no native contacts, a TICA lag
            as long as the reference, thresholds in the wrong order.
    """
    n = {"reference": reference.ca.shape[1], "model": model.ca.shape[1], "folded structure": folded.ca.shape[1]}
    if len(set(n.values())) != 1:
        raise FlowforceError("the inputs have different numbers of Cα: " + ", ".join(f"{k} {v}" for k, v in n.items())
                             + "; they must be the same protein")
    sequences = {"reference": reference.sequence, "model": model.sequence, "folded structure": folded.sequence}
    if len(set(sequences.values())) != 1:
        raise FlowforceError("the inputs are different proteins: " + ", ".join(f"{k} {'-'.join(v)}" for k, v in
                                                                               sequences.items()))
    contacts = native_contacts(folded.ca[0], folded.residues, "ca")
    heavy_contacts = None
    folded_heavy = heavy_atoms(folded)
    if folded_heavy is not None and reference.all_atom is not None:
        try:  # an extra: without heavy-atom contacts the Cα evaluation still stands
            heavy_contacts = native_contacts(folded_heavy[0][0], folded_heavy[1], "heavy-atom")
        except FlowforceError:
            heavy_contacts = None
    ref = _ensemble(reference, folded, contacts, options, heavy_contacts)
    mod = _ensemble(model, folded, contacts, options, heavy_contacts)

    ref_features = inverse_distance_features(reference.ca)
    segments = replica_segments(reference.n_frames, reference.replica)
    tica = fit_tica([ref_features[s] for s in segments], options.tica_lag, dim=2)
    ref.tics = tica.transform(ref_features)
    mod.tics = tica.transform(inverse_distance_features(model.ca))
    if ref.tics.shape[1] < 2:
        raise FlowforceError(f"TICA of the reference found {ref.tics.shape[1]} component(s), two are needed for the "
                             "surface: the reference frames barely move; give a longer reference")

    evaluation = ProteinEvaluation(options, contacts, folded.source, tica, ref, mod)
    evaluation.surfaces["tica"] = surface_comparison(ref.tics, mod.tics, (Axis("tic1", "TIC 1"), Axis("tic2", "TIC 2")),
                                                     bins=options.bins, pseudocount=options.pseudocount)
    q_rmsd_ref = np.stack([ref.q, ref.rmsd_nm], axis=1)
    q_rmsd_mod = np.stack([mod.q, mod.rmsd_nm], axis=1)
    rmsd_top = 1.05 * max(ref.rmsd_nm.max(), mod.rmsd_nm.max(), 1e-3)
    evaluation.surfaces["q_rmsd"] = surface_comparison(
        q_rmsd_ref, q_rmsd_mod, (Axis("q", "Q (native Cα contacts)"), Axis("rmsd", "Cα-RMSD to folded [nm]")),
        ranges=((0.0, 1.0), (0.0, rmsd_top)), bins=options.bins, pseudocount=options.pseudocount)
    return evaluation


def _time_axis(result: EnsembleResult) -> tuple[np.ndarray, str]:
    ps = result.frames.frame_ps
    t = np.arange(result.frames.n_frames, dtype=np.float64)
    return (t * ps / 1000.0, "time [ns]") if ps else (t, "frame")


def _plot_q_series(evaluation: ProteinEvaluation, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..io import atomic_write_bytes

    o = evaluation.options
    fig, axes = plt.subplots(2, 1, figsize=(12, 6), constrained_layout=True, sharey=True)
    for ax, (name, result) in zip(axes, (("reference", evaluation.reference), ("model", evaluation.model))):
        t, label = _time_axis(result)
        ax.plot(t, result.q, lw=0.6, color="0.3")
        ax.axhline(o.q_folded, color="tab:green", ls="--", lw=0.8, label=f"folded core Q ≥ {o.q_folded}")
        ax.axhline(o.q_unfolded, color="tab:red", ls="--", lw=0.8, label=f"unfolded core Q ≤ {o.q_unfolded}")
        for segment in replica_segments(result.frames.n_frames, result.frames.replica):
            s = result.states[segment]
            step = np.flatnonzero((s[1:] != s[:-1]) & (s[:-1] != -1)) + 1
            folding = step[s[step] == FOLDED]
            unfolding = step[s[step] == UNFOLDED]
            # One vlines call per kind: a long run has thousands of events.
            ax.vlines(t[segment[folding]], 0, 1, color="tab:green", lw=0.8, alpha=0.7)
            ax.vlines(t[segment[unfolding]], 0, 1, color="tab:red", lw=0.8, alpha=0.7)
        f = result.fraction
        ax.set_title(f"{name} ({Path(result.frames.source.split()[0]).name}): folded fraction "
                     f"{f.value:.3f} ± {f.stderr:.3f}, {result.events['folding']} folding (green) / "
                     f"{result.events['unfolding']} unfolding (red) events")
        ax.set_xlabel(label)
        ax.set_ylabel("Q")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(loc="lower right", fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


#: Plot file name → what it shows (written by :func:`plot_protein`).
PLOTS = {"fes_tica.png": "FES on (TIC1, TIC2), reference | model | difference",
         "fes_q_rmsd.png": "FES on (Q, Cα-RMSD), reference | model | difference",
         "q_timeseries.png": "Q against time with the cores and the folding / unfolding events"}


def plot_protein(evaluation: ProteinEvaluation, folder: str | Path) -> list[Path]:
    """Write the :data:`PLOTS` into ``folder`` (created if needed), each atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    titles = (f"reference ({Path(evaluation.reference.frames.source.split()[0]).name})",
              f"model ({Path(evaluation.model.frames.source.split()[0]).name})")
    written = [plot_fes(evaluation.surfaces["tica"], folder / "fes_tica.png", titles),
               plot_fes(evaluation.surfaces["q_rmsd"], folder / "fes_q_rmsd.png", titles),
               _plot_q_series(evaluation, folder / "q_timeseries.png")]
    return [Path(p) for p in written]
