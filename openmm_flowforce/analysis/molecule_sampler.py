"""A molecule sampler (flow + importance weights) against reference MD: φ/ψ, bonded terms, energies.

For an energy-only sampler of a small molecule such as alanine dipeptide (FAB, Midgley
et al., ICLR 2023, arXiv 2208.01893, Sec. 4.3), :func:`evaluate_molecule_samples` compares
n model samples x_i, with log importance weights ``log w_i = −u(x_i) − log q(x_i)``, with
reference MD frames:

* φ/ψ Ramachandran histograms (36 × 36 bins of 10°, pseudocount 0.1 per bin, the
  conventions of :mod:`.fes`): Jensen–Shannon divergence and KL(ref‖model) in nats, of the
  raw flow samples (``raw``) and of the samples reweighted by w (``reweighted``, weighted
  counts scaled to sum to n, so the pseudocount means the same in both);
* population of the φ > 0 basins (the rare C7ax / αL region), raw, reweighted and reference;
* Kish effective sample size of w, as a fraction of n;
* the Wasserstein-1 distance of every bond length (nm) and bond angle (degrees)
  distribution, raw and reweighted (:func:`scipy.stats.wasserstein_distance`, weighted);
* reduced energies u = E/kT: mean and median of the model's (raw) and the reference's.

Samples whose weight is not finite get zero weight.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FlowforceError
from .fes import divergences

__all__ = ["backbone_dihedral_atoms", "dihedrals_deg", "evaluate_molecule_samples", "log_weights", "plot_molecule_samples"]

BINS = 36
PSEUDOCOUNT = 0.1


def backbone_dihedral_atoms(topology: Any) -> dict[str, list[int]]:
    """``{"phi": [C, N, CA, C], "psi": [N, CA, C, N]}`` atom indices of a dipeptide's
    middle residue (openmm or mdtraj topology).

    Raises:
        FlowforceError: the topology has no φ/ψ pair (not a peptide with caps).
    """
    import mdtraj

    top = topology if isinstance(topology, mdtraj.Topology) else mdtraj.Topology.from_openmm(topology)
    traj = mdtraj.Trajectory(np.zeros((1, top.n_atoms, 3)), top)
    phi, _ = mdtraj.compute_phi(traj)
    psi, _ = mdtraj.compute_psi(traj)
    if len(phi) < 1 or len(psi) < 1:
        raise FlowforceError("the molecule has no backbone phi/psi dihedral (a capped peptide is needed)")
    return {"phi": [int(a) for a in phi[0]], "psi": [int(a) for a in psi[0]]}


def dihedrals_deg(positions: np.ndarray, atoms: list[int]) -> np.ndarray:
    """IUPAC dihedral in degrees, [−180, 180), of positions ``(T, N, 3)``."""
    from .fes import _dihedral_deg

    return _dihedral_deg(np.asarray(positions, dtype=np.float64), atoms)


def _normalised(log_w: np.ndarray) -> np.ndarray:
    log_w = np.where(np.isfinite(log_w), log_w, -np.inf)
    if not np.isfinite(log_w).any():
        return np.zeros_like(log_w)
    w = np.exp(log_w - log_w.max())
    return w / w.sum()


def _bonded(positions: np.ndarray, bonds: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    from ..potentials.priors import BeadGraph
    from .bonded import bonded_terms

    return bonded_terms(positions, BeadGraph.from_bonds(positions.shape[1], bonds))


def evaluate_molecule_samples(samples: np.ndarray, log_w: np.ndarray, reference: np.ndarray, topology: Any,
                              u_samples: np.ndarray | None = None, u_reference: np.ndarray | None = None,
                              bins: int = BINS, pseudocount: float = PSEUDOCOUNT) -> dict[str, Any]:
    """Report of model samples against reference frames (module docstring).

    Args:
        samples: ``(n, N, 3)`` nm model samples.
        log_w: ``(n,)`` log importance weights (any constant offset).
        reference: ``(m, N, 3)`` nm reference MD frames.
        topology: the molecule's openmm topology (φ/ψ atoms and bonds).
        u_samples, u_reference: reduced energies (kT), optional.

    Returns:
        JSON-ready dict (module docstring for the keys).
    """
    x, ref = np.asarray(samples, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if x.ndim != 3 or ref.ndim != 3 or x.shape[1:] != ref.shape[1:]:
        raise FlowforceError(f"samples {x.shape} and reference {ref.shape} must both be (frames, atoms, 3) "
                             "of the same molecule")
    n = len(x)
    w = _normalised(np.asarray(log_w, dtype=np.float64))
    atoms = backbone_dihedral_atoms(topology)
    angles = {name: (dihedrals_deg(x, idx), dihedrals_deg(ref, idx)) for name, idx in atoms.items()}
    edges = [np.linspace(-180.0, 180.0, bins + 1)] * 2
    ref_counts = np.histogram2d(angles["phi"][1], angles["psi"][1], bins=edges)[0]
    report: dict[str, Any] = {"n_samples": n, "n_reference": len(ref), "bins": bins, "pseudocount": pseudocount,
                              "ess": float(1.0 / np.sum(w * w) / n) if w.sum() > 0 else 0.0}
    bonds = sorted((min(a.index, b.index), max(a.index, b.index)) for a, b in topology.bonds())
    ref_terms = _bonded(ref, bonds)
    model_terms = _bonded(x, bonds)
    from scipy.stats import wasserstein_distance

    ref_positive = float(np.mean(angles["phi"][1] > 0))
    report["phi_positive_reference"] = ref_positive
    for label, weights in (("raw", np.full(n, 1.0 / n)), ("reweighted", w)):
        if weights.sum() == 0:
            report[label] = None
            continue
        counts = np.histogram2d(angles["phi"][0], angles["psi"][0], bins=edges, weights=weights * n)[0]
        d = divergences(ref_counts, counts, pseudocount)
        w1 = {name: float(wasserstein_distance(ref_terms[name], model_terms[name], v_weights=weights))
              for name in ref_terms}
        bond_w1 = [v for k, v in w1.items() if k.startswith("bond")]
        angle_w1 = [v for k, v in w1.items() if k.startswith("angle")]
        report[label] = {"js_phi_psi": d["js"], "kl_phi_psi": d["kl"], "kl_reverse_phi_psi": d["kl_reverse"],
                         "phi_positive": float(np.sum(weights * (angles["phi"][0] > 0))),
                         "bonds_w1_mean_nm": float(np.mean(bond_w1)), "bonds_w1_max_nm": float(np.max(bond_w1)),
                         "angles_w1_mean_deg": float(np.mean(angle_w1)),
                         "angles_w1_max_deg": float(np.max(angle_w1))}
    if u_samples is not None:
        u = np.asarray(u_samples, dtype=np.float64)
        report["energy_median_samples_kT"] = float(np.median(u))
        report["energy_mean_samples_kT"] = float(np.mean(u))
        report["energy_reweighted_mean_kT"] = float(np.sum(w * np.where(np.isfinite(u), u, 0.0)))
    if u_reference is not None:
        report["energy_mean_reference_kT"] = float(np.mean(u_reference))
        report["energy_median_reference_kT"] = float(np.median(u_reference))
    return report


def plot_molecule_samples(samples: np.ndarray, log_w: np.ndarray, reference: np.ndarray, topology: Any,
                          u_samples: np.ndarray, u_reference: np.ndarray, path: str | Path, title: str = "") -> Path:
    """PNG: φ/ψ histograms (reference | flow | reweighted flow) and the energy histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_write_bytes
    import io

    atoms = backbone_dihedral_atoms(topology)
    w = _normalised(np.asarray(log_w, dtype=np.float64))
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    panels = (("reference MD", reference, None), ("flow samples", samples, None), ("flow, reweighted", samples, w))
    edges = np.linspace(-180, 180, BINS + 1)
    for ax, (name, pos, weights) in zip(axes, panels):
        phi, psi = dihedrals_deg(pos, atoms["phi"]), dihedrals_deg(pos, atoms["psi"])
        h = np.histogram2d(phi, psi, bins=[edges, edges], weights=weights)[0]
        with np.errstate(divide="ignore"):
            f = -np.log(h / h.sum())
        f = np.where(np.isfinite(f), f - np.nanmin(np.where(np.isfinite(f), f, np.nan)), np.nan)
        mesh = ax.pcolormesh(edges, edges, f.T, cmap="viridis", vmax=8)
        ax.set(title=name, xlabel="φ (deg)", ylabel="ψ (deg)")
    fig.colorbar(mesh, ax=axes[2], label="free energy (kT)")
    u, ur = np.asarray(u_samples), np.asarray(u_reference)
    lo, hi = float(np.percentile(ur, 0.1)) - 5, float(np.percentile(ur, 99.9)) + 30
    ebins = np.linspace(lo, hi, 60)
    axes[3].hist(ur, bins=ebins, density=True, alpha=0.5, label="reference MD")
    axes[3].hist(np.clip(u, lo, hi), bins=ebins, density=True, alpha=0.5, label="flow (clipped at the right)")
    axes[3].hist(np.clip(u, lo, hi), bins=ebins, weights=w, density=True, histtype="step", color="k",
                 label="flow, reweighted")
    axes[3].set(xlabel="u = E/kT", ylabel="density", title="energies")
    axes[3].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def log_weights(u: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """``−u − log q`` with non-finite entries set to −inf (zero weight)."""
    lw = -np.asarray(u, dtype=np.float64) - np.asarray(log_q, dtype=np.float64)
    return np.where(np.isfinite(lw), lw, -math.inf)


def weighted_samples(method: Any, model: Any, target: Any, n: int, seed: int = 0,
                     chunk: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` samples ``(n, N, 3)`` nm of a trained molecule sampler, their reduced energies
    ``(n,)`` (the target's, regularised) and log weights ``−u − log q`` ``(n,)``; the caller's
    RNG is left alone."""
    import torch

    xs, us, lws = [], [], []
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, n, chunk):
            x = method.sample(model, min(chunk, n - start)).to(torch.float64)
            log_q = method.log_prob(model, x)
            u = target.energy(x)
            xs.append(x.reshape(len(x), -1, 3).numpy())
            us.append(u.numpy())
            lws.append(log_weights(u.numpy(), log_q.numpy()))
    return np.concatenate(xs), np.concatenate(us), np.concatenate(lws)


def evaluate_molecule_sampler(method: Any, model: Any, target: Any, reference: np.ndarray, n: int,
                              seed: int = 0, plot: str | Path | None = None, title: str = "") -> dict[str, Any]:
    """:func:`evaluate_molecule_samples` for ``n`` fresh samples of a trained sampler against
    reference frames ``(m, N, 3)`` nm of the same molecule (e.g. ``flowforce md`` positions);
    ``plot``: also write :func:`plot_molecule_samples` there."""
    import torch

    x, u, lw = weighted_samples(method, model, target, n, seed)
    ref = np.asarray(reference, dtype=np.float64)
    with torch.no_grad():
        u_ref = np.concatenate([target.energy(torch.as_tensor(chunk.reshape(len(chunk), -1))).numpy()
                                for chunk in np.array_split(ref, max(1, len(ref) // 1024))])
    report = evaluate_molecule_samples(x, lw, ref, target.topology, u, u_ref)
    if plot is not None:
        plot_molecule_samples(x, lw, ref, target.topology, u, u_ref, plot, title)
        report["plot"] = str(plot)
    return report
