"""Protein evaluation maths: Q and Cα-RMSD on chignolin structures, transition-based
assignment and event counting on constructed sequences, folded fraction with its error and
deeptime TICA on a synthetic two-state process with known answers."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from openmm_flowforce.analysis.kinetics import (FOLDED, UNASSIGNED, UNFOLDED, count_events, fit_tica,
                                                folded_fraction, transition_based_assignment)
from openmm_flowforce.analysis.protein import (ca_rmsd, fraction_native_contacts, kabsch_rmsd, native_contacts)
from openmm_flowforce.analysis.protein_frames import heavy_atoms, load_folded_structure
from openmm_flowforce.errors import FlowforceError

HAIRPIN = Path(__file__).parent / "data" / "cln025_hairpin.pdb"
SHARED_DATA = Path(os.environ.get("FLOWFORCE_SHARED_DATA")
                   or Path(__file__).resolve().parent.parent.parent / "shared" / "data")
EXTENDED = SHARED_DATA / "cln025" / "cln025.pdb"


def _rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


# -- Q and RMSD ------------------------------------------------------------------------------------
@pytest.mark.parametrize("definition", ["ca", "heavy-atom"])
def test_native_structure_has_q_one_and_rmsd_zero_even_rotated(definition: str) -> None:
    folded = load_folded_structure(HAIRPIN)
    x, residues = (folded.ca[0], folded.residues) if definition == "ca" else \
        (heavy_atoms(folded)[0][0], heavy_atoms(folded)[1])
    contacts = native_contacts(x, residues, definition)
    assert contacts.n_contacts >= (8 if definition == "ca" else 30)
    moved = x @ _rotation(3).T + np.array([1.0, -2.0, 0.5])
    q = fraction_native_contacts(np.stack([x, moved]), contacts)
    np.testing.assert_array_less(1.0 - q, 1e-4)
    np.testing.assert_allclose(kabsch_rmsd(np.stack([x, moved]), x), 0.0, atol=1e-6)


def test_q_falls_and_rmsd_grows_as_the_hairpin_is_stretched_or_shaken() -> None:
    folded = load_folded_structure(HAIRPIN)
    x = folded.ca[0]
    contacts = native_contacts(x, folded.residues, "ca")
    centre = x.mean(axis=0)
    stretched = np.stack([centre + s * (x - centre) for s in (1.0, 1.1, 1.3, 1.6, 2.0)])
    q, rmsd = fraction_native_contacts(stretched, contacts), ca_rmsd(stretched, x)
    assert np.all(np.diff(q) < 0) and q[-1] < 0.05
    assert np.all(np.diff(rmsd) > 0)
    # Uniform scaling by s moves every bead by (s - 1)|x_i - c|: RMSD = (s - 1) * radius of gyration.
    rg = np.sqrt(((x - centre) ** 2).sum(-1).mean())
    np.testing.assert_allclose(rmsd, (np.array([1.0, 1.1, 1.3, 1.6, 2.0]) - 1.0) * rg, rtol=1e-9, atol=1e-9)
    rng = np.random.default_rng(0)
    shaken = np.stack([x + rng.normal(scale=s, size=x.shape) for s in (0.0, 0.05, 0.2, 0.5)])
    q_shaken = fraction_native_contacts(shaken, contacts)
    assert np.all(np.diff(q_shaken) < 0) and np.all(np.diff(ca_rmsd(shaken, x)) > 0)


def test_kabsch_rmsd_matches_mdtraj_and_refuses_reflections() -> None:
    if not EXTENDED.is_file():
        pytest.skip(f"shared data not found at {EXTENDED}")
    import mdtraj

    folded, extended = load_folded_structure(HAIRPIN), load_folded_structure(EXTENDED)
    hairpin_md, extended_md = mdtraj.load(str(HAIRPIN)), mdtraj.load(str(EXTENDED))
    ca = hairpin_md.topology.select("name CA")
    expected = mdtraj.rmsd(extended_md, hairpin_md, atom_indices=ca)
    np.testing.assert_allclose(ca_rmsd(extended.ca, folded.ca[0]), expected, rtol=1e-5)
    mirror = folded.ca[0] * np.array([-1.0, 1.0, 1.0])
    assert ca_rmsd(mirror[None], folded.ca[0])[0] > 0.05  # a proper rotation cannot undo a mirror


def test_extended_structure_has_no_native_contacts_one_line_error() -> None:
    if not EXTENDED.is_file():
        pytest.skip(f"shared data not found at {EXTENDED}")
    extended = load_folded_structure(EXTENDED)
    with pytest.raises(FlowforceError, match="no native contacts") as error:
        native_contacts(extended.ca[0], extended.residues, "ca")
    assert "\n" not in str(error.value)
    with pytest.raises(FlowforceError, match="unknown contact definition 'cb'.*valid: heavy-atom, ca"):
        native_contacts(extended.ca[0], extended.residues, "cb")


# -- transition-based assignment -------------------------------------------------------------------
def test_transition_counting_ignores_noise_at_the_thresholds() -> None:
    lo, hi = 0.3, 0.7
    # Start in the gap (unassigned), fold, jitter around the folded threshold (no event), dip into
    # the gap and back (no event), unfold, jitter around the unfolded threshold (no event), fold
    # again via the gap, then unfold with a recrossing of 0.3 on the way.
    pieces = [[0.5, 0.5], [0.2, 0.25],           # first core: unfolded
              [0.5, 0.69, 0.71],                  # fold (event 1)
              [0.69, 0.71, 0.699, 0.72, 0.5, 0.4, 0.65, 0.8],  # noise at 0.7, excursions into the gap
              [0.5, 0.29],                        # unfold (event 2)
              [0.31, 0.29, 0.35, 0.28, 0.6, 0.31],  # noise at 0.3 and a failed folding attempt
              [0.9],                              # fold (event 3)
              [0.31, 0.29, 0.31, 0.1]]            # unfold (event 4), recrossing 0.3
    q = np.concatenate([np.asarray(p, float) for p in pieces])
    states = transition_based_assignment(q, lo, hi)
    assert states[0] == states[1] == UNASSIGNED
    assert count_events(states) == {"folding": 2, "unfolding": 2}
    # Every frame in the gap keeps the previous core's state.
    assert states[list(q).index(0.4)] == FOLDED and states[list(q).index(0.6)] == UNFOLDED
    with pytest.raises(FlowforceError, match="must lie below"):
        transition_based_assignment(q, 0.7, 0.3)


def test_assignment_restarts_at_each_replica() -> None:
    q = np.array([0.9, 0.5, 0.5, 0.1, 0.5, 0.9])
    one = transition_based_assignment(q, 0.3, 0.7)
    assert one.tolist() == [FOLDED, FOLDED, FOLDED, UNFOLDED, UNFOLDED, FOLDED]
    assert count_events(one) == {"folding": 1, "unfolding": 1}
    # Frames 0-2 and 3-5 are two replicas: replica 1 starts in the gap (unassigned, not "folded
    # because replica 0 ended folded"), and nothing crosses the boundary.
    replica = np.array([0, 0, 0, 1, 1, 1])
    two = transition_based_assignment(q, 0.3, 0.7, replica)
    assert two.tolist() == [FOLDED, FOLDED, FOLDED, UNFOLDED, UNFOLDED, FOLDED]
    shifted = np.array([0.9, 0.5, 0.5, 0.5, 0.1, 0.9])
    split = transition_based_assignment(shifted, 0.3, 0.7, replica)
    assert split[3] == UNASSIGNED
    assert count_events(split, replica) == {"folding": 1, "unfolding": 0}
    assert count_events(transition_based_assignment(shifted, 0.3, 0.7)) == {"folding": 1, "unfolding": 1}


# -- synthetic two-state process: folded fraction and TICA -----------------------------------------
def _two_state(seed: int, n: int, p_fold: float, p_unfold: float) -> np.ndarray:
    """Markov jump process on {0, 1} (1 folded) with per-step switching probabilities."""
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    s = np.empty(n, dtype=np.int64)
    s[0] = int(u[0] < p_fold / (p_fold + p_unfold))  # start in equilibrium
    for t in range(1, n):
        flip = p_unfold if s[t - 1] else p_fold
        s[t] = 1 - s[t - 1] if u[t] < flip else s[t - 1]
    return s


def test_folded_fraction_and_its_error_cover_the_known_population() -> None:
    p_fold, p_unfold = 0.004, 0.002
    population = p_fold / (p_fold + p_unfold)  # 2/3
    n = 60_000
    s = _two_state(1, n, p_fold, p_unfold)
    q = s + np.random.default_rng(2).normal(scale=0.08, size=n)
    states = transition_based_assignment(q, 0.3, 0.7)
    fraction = folded_fraction(states, n_blocks=10)
    assert fraction.blocks == "time" and len(fraction.block_values) == 10
    # The error is a real one: the SE is ~0.035 here (about 16 transitions per block).
    assert 0.005 < fraction.stderr < 0.06
    assert abs(fraction.value - population) < 3 * fraction.stderr
    # The same frames as 6 independent replicas: the error comes from the replicas.
    replica = np.repeat(np.arange(6), n // 6)
    by_replica = folded_fraction(transition_based_assignment(q, 0.3, 0.7, replica), replica)
    assert by_replica.blocks == "replica" and len(by_replica.block_values) == 6
    assert abs(by_replica.value - population) < 3 * by_replica.stderr
    events = count_events(states)
    assert abs(events["folding"] - events["unfolding"]) <= 1
    assert 0.8 < events["folding"] / (n * population * p_unfold) < 1.2  # mean number of unfoldings
    with pytest.raises(FlowforceError, match="no frame reaches a core"):
        folded_fraction(np.full(10, UNASSIGNED))


def test_tica_recovers_the_slow_direction_and_its_analytic_timescale() -> None:
    """A symmetric jump process s_t ∈ {−1, +1} (flip probability p per frame) along a unit
    vector v in 6 dimensions, plus isotropic AR(1) noise (coefficient a, stationary variance σ²).
    Along v the lag-τ autocorrelation is exactly λ = (S(1 − 2p)^τ + σ² a^τ) / (S + σ²), S = 1
    the variance of s, and since the noise is isotropic TIC1's coefficient vector is parallel
    to v. Implied timescale t = −τ / log λ; over 5 seeds the estimates scatter by about 4 %
    around it, so the tolerance is 12 %."""
    rng = np.random.default_rng(7)
    n, dim, p, a, sigma, tau = 100_000, 6, 0.002, 0.5, 0.3, 20
    s = 2.0 * (np.cumsum(rng.random(n) < p) % 2) - 1.0
    v = rng.normal(size=dim)
    v /= np.linalg.norm(v)
    kicks = rng.normal(scale=sigma * np.sqrt(1 - a * a), size=(n, dim))
    noise = np.empty((n, dim))
    noise[0] = kicks[0] / np.sqrt(1 - a * a)
    for t in range(1, n):
        noise[t] = a * noise[t - 1] + kicks[t]
    x = s[:, None] * v + noise
    result = fit_tica(x, tau, dim=2)
    coefficients = np.asarray(result.model.instantaneous_coefficients)[:, 0]
    assert abs(coefficients @ v) / np.linalg.norm(coefficients) > 0.95
    lam = ((1 - 2 * p) ** tau + sigma ** 2 * a ** tau) / (1 + sigma ** 2)
    expected = -tau / np.log(lam)
    assert abs(result.timescales_frames[0] / expected - 1) < 0.12
    # TIC2 is noise: its timescale is that of the AR(1) noise, −1/log a ≈ 1.4 frames, far below.
    assert np.isnan(result.timescales_frames[1]) or result.timescales_frames[1] < 0.1 * expected
    tic1 = result.transform(x)[:, 0]
    assert abs(np.corrcoef(tic1, s)[0, 1]) > 0.9
    # Replicas: two halves fitted as separate trajectories give the same answer.
    halves = fit_tica([x[: n // 2], x[n // 2:]], tau, dim=2)
    assert abs(halves.timescales_frames[0] / expected - 1) < 0.12
    with pytest.raises(FlowforceError, match="lag time"):
        fit_tica(x[:10], 20)
