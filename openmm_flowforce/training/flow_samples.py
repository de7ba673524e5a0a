"""Training points for flow-matching: flow samples, the flow's forces and energies there.

A flow ``q`` fitted to CG data (:mod:`~openmm_flowforce.training.flow_matching`) gives the CG
mean force ``kT ∇ log q`` and free energy ``−kT log q`` anywhere. This module draws the points
(samples of one flow or of an ensemble of flows, optionally with turned torsions) and drops
samples whose forces are outliers by a stated rule.

An **ensemble** of ``K`` flows fitted to the same data with different seeds
(:class:`FlowEnsemble`) averages their reduced forces and log densities: the forces of the
(normalised) geometric mean ``∏ q_k^{1/K}``. Where the members agree (the data) it changes
little; their roughness, which differs from seed to seed, averages down by up to ``1/√K``.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import numpy as np
import torch

from ..conventions import kT
from ..errors import FlowforceError
from ..flows.losses import flow_forces
from ..potentials.boltzmann import BoltzmannGenerator

Tensor = torch.Tensor

__all__ = ["FORCE_OUTLIER_FACTOR", "FORCE_OUTLIER_PERCENTILE", "FlowEnsemble", "drop_force_outliers",
           "force_outlier_threshold", "jitter_torsions", "max_bead_force_norm", "sample_flow_forces",
           "within_data_contacts"]

#: Default outlier rule: keep a flow sample when max_I |F_I| ≤ FACTOR × (PERCENTILE-th percentile on data).
FORCE_OUTLIER_PERCENTILE = 99.9
FORCE_OUTLIER_FACTOR = 3.0


class FlowEnsemble:
    """Flows of one density whose forces and log densities are averaged (module docstring).

    Args:
        members: trained Boltzmann generators over the same CG molecule (one is allowed).

    Attributes:
        members: the models as given (sampling runs in their dtype).
        members64: float64 eval-mode copies without parameter gradients (forces).
    """

    def __init__(self, members: Sequence[BoltzmannGenerator]):
        if not members:
            raise FlowforceError("a flow ensemble needs at least one flow")
        self.members = list(members)
        self.members64 = [copy.deepcopy(m).to(torch.float64).eval().requires_grad_(False) for m in self.members]

    def log_q_and_forces(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``log q_k`` ``(B,)`` and mean reduced forces ``∇ log q_k`` ``(B, n, 3)`` at float64 ``x``."""
        log_q, forces = flow_forces(self.members64[0], x)
        for member in self.members64[1:]:
            more_log_q, more_forces = flow_forces(member, x)
            log_q, forces = log_q + more_log_q, forces + more_forces
        k = len(self.members64)
        return log_q / k, forces / k


def sample_flow_forces(model: "BoltzmannGenerator | FlowEnsemble", n: int, temperature: float, batch_size: int = 1024,
                       seed: int = 0, progress: bool = False,
                       return_energies: bool = False) -> tuple[np.ndarray, ...]:
    """``n`` samples of a Boltzmann generator and its forces there.

    Sampling (``to_data``, root finding) runs in the model's dtype; the forces
    ``F = kT ∇_X log q(X)`` are computed by autograd through the analytic ``to_latent``
    direction on a float64 copy of the model.

    Args:
        model: the trained density over CG positions, or a :class:`FlowEnsemble` (batches are
            drawn from its members in turn; forces and energies are the ensemble's).
        n: number of samples.
        temperature: K; forces are ``kT ×`` the reduced forces ``∇ log q``.
        batch_size: samples per call.
        seed: the samples' random stream (drawn in a fork of torch's RNG: the caller's
            stream is untouched).
        progress: show a tqdm bar.
        return_energies: also return the flow's energies ``U = −kT log q(X)`` ``(n',)`` kJ/mol
            (the CG free energy up to a constant, if ``q`` were exact).

    Returns:
        Positions ``(n', n_beads, 3)`` nm and forces ``(n', n_beads, 3)`` kJ/mol/nm, float64
        numpy (and the energies); ``n' < n`` only if some samples were not finite (dropped).
    """
    from tqdm.auto import tqdm

    if int(n) < 1:
        raise FlowforceError(f"the number of flow samples must be at least 1, got {n}")
    ensemble = model if isinstance(model, FlowEnsemble) else FlowEnsemble([model])
    positions, forces, energies = [], [], []
    bar = tqdm(total=int(n), desc="flow samples + forces", unit="sample", disable=not progress or None)
    with torch.random.fork_rng(devices=[]), bar:
        torch.manual_seed(seed)
        done, batch = 0, 0
        while done < n:
            size = min(int(batch_size), int(n) - done)
            with torch.no_grad():
                x = ensemble.members[batch % len(ensemble.members)].sample(size).to(torch.float64)
            log_q, reduced = ensemble.log_q_and_forces(x)
            batch += 1
            positions.append(x.detach().numpy())
            forces.append(kT(temperature) * reduced.detach().numpy())
            energies.append(-kT(temperature) * log_q.detach().numpy())
            done += size
            bar.update(size)
    x, f, u = np.concatenate(positions), np.concatenate(forces), np.concatenate(energies)
    finite = np.isfinite(x).all(axis=(1, 2)) & np.isfinite(f).all(axis=(1, 2)) & np.isfinite(u)
    return (x[finite], f[finite], u[finite]) if return_energies else (x[finite], f[finite])


def jitter_torsions(model: "BoltzmannGenerator | FlowEnsemble", positions: np.ndarray, sigma_rad: float, seed: int = 0,
                    batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flow samples with their periodic torsions turned by normal noise, and the flow's forces there.

    Force matching fits the CG net where its training points are; flow samples lie where the
    data were, so the net's energy elsewhere (e.g. the φ > 0 region of alanine dipeptide when
    the data never went there) is an extrapolation, and CG MD may find it lower than the
    basins. The flow's density is defined everywhere, so its forces at turned configurations
    tell the net how the free energy rises away from the data. Bonds and angles keep their
    sampled values, so the points stay on the flow's stiff-mode manifold. The force-matching
    minimiser is unchanged (the flow's forces wherever the net has capacity); only where the
    net learns them widens.

    Args:
        model: the trained density over CG positions (or a :class:`FlowEnsemble`).
        positions: flow samples ``(T, n, 3)`` nm.
        sigma_rad: standard deviation of the turn of every periodic torsion, radians.
        seed: the noise's random stream.
        batch_size: frames per force evaluation.

    Returns:
        Turned positions and the flow's forces there ``(T', n, 3)`` (nm; reduced units,
        ∇ log q: multiply by kT) and ``log q`` there ``(T',)``, float64; non-finite frames dropped.
    """
    ensemble = model if isinstance(model, FlowEnsemble) else FlowEnsemble([model])
    ic = ensemble.members64[0].coordinates
    periodic = torch.tensor(ic.periodic, dtype=torch.bool)
    generator = torch.Generator().manual_seed(int(seed))
    xs, fs, ls = [], [], []
    for start in range(0, len(positions), batch_size):
        x = torch.as_tensor(positions[start:start + batch_size], dtype=torch.float64)
        with torch.no_grad():
            u, _ = ic.to_unit(x, check=False)
            turn = torch.randn(u.shape, generator=generator, dtype=torch.float64) * (sigma_rad / (2.0 * math.pi))
            u = torch.where(periodic, torch.remainder(u + turn, 1.0), u)
            turned, _ = ic.from_unit(u)
        log_q, reduced = ensemble.log_q_and_forces(turned)
        xs.append(turned.numpy())
        fs.append(reduced.detach().numpy())
        ls.append(log_q.detach().numpy())
    x, f, log_q = np.concatenate(xs), np.concatenate(fs), np.concatenate(ls)
    finite = np.isfinite(x).all(axis=(1, 2)) & np.isfinite(f).all(axis=(1, 2)) & np.isfinite(log_q)
    return x[finite], f[finite], log_q[finite]


def max_bead_force_norm(forces: Any) -> np.ndarray:
    """``max_I |F_I|`` per frame of forces ``(T, n, 3)``: ``(T,)`` in the forces' unit."""
    return np.linalg.norm(np.asarray(forces, dtype=np.float64), axis=-1).max(axis=-1)


def force_outlier_threshold(reference_forces: Any, percentile: float = FORCE_OUTLIER_PERCENTILE,
                            factor: float = FORCE_OUTLIER_FACTOR) -> float:
    """``factor ×`` the ``percentile``-th percentile of :func:`max_bead_force_norm` over
    ``reference_forces`` ``(T, n, 3)`` (the flow's forces on the data frames), kJ/mol/nm.

    Raises:
        ValueError: a percentile outside [0, 100] or a factor ≤ 0.
    """
    if not 0.0 <= percentile <= 100.0:
        raise FlowforceError(f"outlier percentile must be in [0, 100], got {percentile}")
    if not factor > 0:
        raise FlowforceError(f"outlier factor must be positive, got {factor}")
    return float(factor * np.percentile(max_bead_force_norm(reference_forces), percentile))


def drop_force_outliers(positions: np.ndarray, forces: np.ndarray,
                        threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the frames whose :func:`max_bead_force_norm` is at most ``threshold``.

    Returns:
        ``(positions[kept], forces[kept], kept)`` with ``kept`` a boolean ``(T,)``.
    """
    kept = max_bead_force_norm(forces) <= threshold
    return positions[kept], forces[kept], kept


def within_data_contacts(positions: np.ndarray, data: np.ndarray, pairs: Any,
                         factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Which frames keep every listed bead pair at least ``factor ×`` as far apart as the data ever had it.

    A flow fitted to few frames of a chain spreads its torsions smoothly and so puts mass where
    non-bonded beads come closer than they ever did in the data (chignolin's Cα flow from 1000
    frames: 13 % of its samples have a pair ≥ 3 bonds apart closer than 0.35 nm, where no data
    frame came below 0.38 nm), and it gives those contacts hardly more free energy than any
    other sample. A CG net trained there learns an attraction the data never showed (its CG
    MD collapsed to a radius of gyration of 0.39 nm against the data's 0.46–0.73 nm). Those
    samples are outside the data's support and are dropped.

    Args:
        positions: candidate frames ``(T, n, 3)`` nm.
        data: the data frames ``(T', n, 3)`` nm.
        pairs: ``(P, 2)`` bead index pairs (e.g. the pairs ≥ 3 bonds apart).
        factor: > 0; a pair may come this fraction of its closest data distance close.

    Returns:
        ``(kept, closest)``: a boolean ``(T,)`` and each pair's closest data distance ``(P,)`` nm.
    """
    if not factor > 0:
        raise FlowforceError(f"the contact factor must be positive, got {factor}")
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)

    def distances(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return np.linalg.norm(x[:, pairs[:, 0]] - x[:, pairs[:, 1]], axis=-1)

    closest = distances(data).min(axis=0) if len(pairs) else np.zeros(0)
    kept = (distances(positions) >= factor * closest).all(axis=1)
    return kept, closest
