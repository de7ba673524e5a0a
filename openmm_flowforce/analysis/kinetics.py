r"""Two-state kinetics of a folding coordinate: transition-based assignment, folding and
unfolding events, the folded fraction with a statistical error, and TICA.

Transition-based assignment (core sets; Buchete & Hummer, J. Phys. Chem. B 112, 6057 (2008)).
Two thresholds on an order parameter (here Q, folded when high) define two *cores*: folded
``Q ≥ q_folded`` and unfolded ``Q ≤ q_unfolded``, with ``q_unfolded < q_folded``. Every frame
gets the state of the last core visited (hysteresis): a trajectory that wanders out of the
folded core into the gap between the thresholds, and back, stays folded. Frames before the
first core visit are unassigned (−1) and take no part in populations. A *folding event* is an
entry into the folded core of a trajectory whose last core was the unfolded one; an
*unfolding event* the reverse. Recrossings of one threshold (noise at the threshold) never
count: an event needs a visit to the other core in between.

Independent trajectories (replicas) are assigned separately: the assignment restarts at the
start of each replica, and no event spans two of them.

Folded fraction and its error (:func:`folded_fraction`). The estimate is the fraction of
assigned frames that are folded, pooled over all frames. Its standard error comes from
independent blocks: the replicas when the data say which frame belongs to which (a
``replica`` array), otherwise ``n_blocks`` contiguous time blocks of equal length (the block
averaging of Flyvbjerg & Petersen, J. Chem. Phys. 91, 461 (1989)). With block fractions f_b
over n_b assigned frames, w_b = n_b / Σ n_b and f = Σ w_b f_b,

    SE² = B/(B − 1) · Σ_b w_b² (f_b − f)²,

which for equal blocks is the variance of the block means over B. The blocks must be longer
than the folding/unfolding times for the error to be honest; the report gives the number of
events per block so a reader can judge.

TICA (time-lagged independent component analysis; Pérez-Hernández, Paul, Giorgino,
De Fabritiis, Noé, J. Chem. Phys. 139, 015102 (2013), arXiv:1302.6614) is deeptime's
``deeptime.decomposition.TICA`` (Hoffmann et al., Mach. Learn.: Sci. Technol. 3, 015009
(2022), arXiv:2110.15013), fitted on the reference trajectories (one per replica, so no lag
pair spans two) and applied unchanged to the model. Implied timescales t_k = −τ / log λ_k in
frames, with λ_k the TICA eigenvalues (singular values) at lag τ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import FlowforceError

__all__ = ["FOLDED", "UNASSIGNED", "UNFOLDED", "FoldedFraction", "TICAResult", "count_events", "fit_tica",
           "folded_fraction", "replica_segments", "transition_based_assignment"]

UNASSIGNED, UNFOLDED, FOLDED = -1, 0, 1


def replica_segments(n_frames: int, replica: Any | None) -> list[np.ndarray]:
    """Frame indices of each independent trajectory, in file order.

    Args:
        n_frames: T.
        replica: ``(T,)`` integer replica id of every frame, or None (one trajectory).

    Raises:
        FlowforceError: a replica array of the wrong shape or not integer.
    """
    if replica is None:
        return [np.arange(n_frames)]
    ids = np.asarray(replica)
    if ids.shape != (n_frames,) or not np.issubdtype(ids.dtype, np.integer):
        raise FlowforceError(f"the replica array must hold one integer per frame, shape ({n_frames},), got "
                             f"{ids.dtype} {ids.shape}")
    return [np.flatnonzero(ids == r) for r in np.unique(ids)]


def _check_thresholds(q_unfolded: float, q_folded: float) -> None:
    if not q_unfolded < q_folded:
        raise FlowforceError(f"the unfolded threshold ({q_unfolded}) must lie below the folded one ({q_folded})")


def transition_based_assignment(q: Any, q_unfolded: float, q_folded: float,
                                replica: Any | None = None) -> np.ndarray:
    """State of every frame by the last core visited (module docstring).

    Args:
        q: ``(T,)`` order parameter, folded when high (Q).
        q_unfolded, q_folded: core thresholds, ``q_unfolded < q_folded``.
        replica: ``(T,)`` replica ids or None.

    Returns:
        ``(T,)`` int: :data:`FOLDED` (1), :data:`UNFOLDED` (0) or :data:`UNASSIGNED` (−1).
    """
    _check_thresholds(q_unfolded, q_folded)
    values = np.asarray(q, dtype=np.float64).ravel()
    core = np.full(len(values), UNASSIGNED, dtype=np.int64)
    core[values >= q_folded] = FOLDED
    core[values <= q_unfolded] = UNFOLDED
    states = np.full(len(values), UNASSIGNED, dtype=np.int64)
    for frames in replica_segments(len(values), replica):
        c = core[frames]
        # Forward-fill the last core visit: index of the latest frame at or before t that is in a core.
        last = np.maximum.accumulate(np.where(c != UNASSIGNED, np.arange(len(c)), -1))
        states[frames] = np.where(last >= 0, c[np.maximum(last, 0)], UNASSIGNED)
    return states


def count_events(states: Any, replica: Any | None = None) -> dict[str, int]:
    """Folding (unfolded → folded) and unfolding events of an assignment, per replica and summed.

    Returns:
        ``{"folding": n, "unfolding": m}``.
    """
    s = np.asarray(states, dtype=np.int64).ravel()
    folding = unfolding = 0
    for frames in replica_segments(len(s), replica):
        a = s[frames]
        a = a[a != UNASSIGNED]
        folding += int(np.sum((a[:-1] == UNFOLDED) & (a[1:] == FOLDED)))
        unfolding += int(np.sum((a[:-1] == FOLDED) & (a[1:] == UNFOLDED)))
    return {"folding": folding, "unfolding": unfolding}


@dataclass(frozen=True)
class FoldedFraction:
    """Folded fraction, its standard error and what the error is made of.

    Attributes:
        value: fraction of assigned frames that are folded.
        stderr: standard error from the blocks (NaN with fewer than 2 usable blocks).
        blocks: ``"replica"`` or ``"time"``; block_values: f_b; block_frames: n_b (assigned).
        n_assigned: frames with a state; n_frames: all frames.
    """

    value: float
    stderr: float
    blocks: str
    block_values: list[float]
    block_frames: list[int]
    n_assigned: int
    n_frames: int

    def report(self) -> dict[str, Any]:
        return {"value": self.value, "stderr": self.stderr, "error_from": f"{len(self.block_values)} {self.blocks} blocks",
                "block_values": self.block_values, "block_frames": self.block_frames,
                "assigned_frames": self.n_assigned, "frames": self.n_frames}


def folded_fraction(states: Any, replica: Any | None = None, n_blocks: int = 10) -> FoldedFraction:
    """Folded fraction with a block (or per-replica) standard error (module docstring).

    Args:
        states: ``(T,)`` assignment (:func:`transition_based_assignment`).
        replica: ``(T,)`` replica ids, or None for time blocks.
        n_blocks: time blocks when there is no replica array (ignored otherwise).

    Raises:
        FlowforceError: no frame is assigned, or fewer than 2 blocks.
    """
    s = np.asarray(states, dtype=np.int64).ravel()
    if replica is not None:
        segments, kind = replica_segments(len(s), replica), "replica"
    else:
        if int(n_blocks) < 2:
            raise FlowforceError(f"the error needs at least 2 blocks, got {n_blocks}")
        segments, kind = np.array_split(np.arange(len(s)), min(int(n_blocks), max(len(s), 1))), "time"
    assigned = s != UNASSIGNED
    if not assigned.any():
        raise FlowforceError("no frame reaches a core (folded or unfolded): the thresholds lie outside the range of Q")
    value = float(np.mean(s[assigned] == FOLDED))
    n_b = np.array([int(assigned[f].sum()) for f in segments])
    f_b = np.array([float(np.mean(s[f][assigned[f]] == FOLDED)) if n else np.nan for f, n in zip(segments, n_b)])
    used = n_b > 0
    if used.sum() >= 2:
        w = n_b[used] / n_b[used].sum()
        b = int(used.sum())
        stderr = float(np.sqrt(b / (b - 1) * np.sum(w ** 2 * (f_b[used] - value) ** 2)))
    else:
        stderr = float("nan")
    return FoldedFraction(value, stderr, kind, [float(v) for v in f_b], [int(n) for n in n_b], int(assigned.sum()),
                          int(len(s)))


@dataclass
class TICAResult:
    """A TICA model fitted on the reference, and its projections.

    Attributes:
        model: deeptime's ``CovarianceKoopmanModel``.
        lagtime: τ in frames.
        eigenvalues: λ_k of the leading components.
        timescales_frames: −τ / log λ_k (NaN where λ_k ∉ (0, 1)).
    """

    model: Any
    lagtime: int
    eigenvalues: np.ndarray
    timescales_frames: np.ndarray

    def transform(self, features: np.ndarray) -> np.ndarray:
        """``(T, n_features)`` → ``(T, dim)`` TICs."""
        return np.asarray(self.model.transform(np.asarray(features, dtype=np.float64)))


def fit_tica(features: np.ndarray | Sequence[np.ndarray], lagtime: int, dim: int = 2) -> TICAResult:
    """Fit deeptime's TICA on one trajectory ``(T, F)`` or a list of independent ones.

    ``scaling=None`` keeps the TICs as unit-variance projections (the kinetic-map scaling
    would multiply them by λ_k, which only rescales the FES axes).

    Raises:
        FlowforceError: a lag time that leaves no pair of frames in any trajectory.
    """
    from deeptime.decomposition import TICA

    trajectories = [np.asarray(features, dtype=np.float64)] if isinstance(features, np.ndarray) else \
        [np.asarray(f, dtype=np.float64) for f in features]
    usable = [t for t in trajectories if len(t) > lagtime]
    if int(lagtime) < 1 or not usable:
        longest = max(len(t) for t in trajectories)
        raise FlowforceError(f"the TICA lag time must be at least 1 frame and shorter than a trajectory "
                             f"(longest {longest} frames), got {lagtime}")
    estimator = TICA(lagtime=int(lagtime), dim=int(dim), scaling=None)
    model = estimator.fit(usable).fetch_model()
    eigenvalues = np.asarray(model.singular_values[:dim], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        # λ ≤ 0: decorrelated within one lag, λ ≥ 1: no decay seen; no timescale in either case.
        timescales = np.where((eigenvalues > 0) & (eigenvalues < 1), -lagtime / np.log(eigenvalues), np.nan)
    return TICAResult(model, int(lagtime), eigenvalues, timescales)
