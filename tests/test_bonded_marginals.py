"""Wasserstein-1 of CG bond and angle distributions (analysis/bonded.py): known answers."""
import numpy as np
import pytest

from openmm_flowforce.analysis.bonded import bonded_terms, bonds_of_pdb, compare_bonded
from openmm_flowforce.errors import FlowforceError
from openmm_flowforce.potentials.priors import BeadGraph


def chain(r1, r2, theta_deg):
    """Three beads: bond 0-1 of length r1 along x, bond 1-2 of length r2 at angle theta (deg)."""
    theta = np.radians(theta_deg)
    x = np.zeros((len(r1), 3, 3))
    x[:, 0, 0] = -r1
    x[:, 2, 0] = -r2 * np.cos(theta)
    x[:, 2, 1] = r2 * np.sin(theta)
    return x


def test_terms_and_shifts_give_exact_w1():
    rng = np.random.default_rng(0)
    r1, r2 = 0.38 + 0.01 * rng.standard_normal(500), 0.38 + 0.01 * rng.standard_normal(500)
    theta = 110 + 8 * rng.standard_normal(500)
    reference = chain(r1, r2, theta)
    terms = bonded_terms(reference, BeadGraph.from_bonds(3, [(0, 1), (1, 2)]))
    np.testing.assert_allclose(terms["bond 0-1"], r1, atol=1e-12)
    np.testing.assert_allclose(terms["angle 0-1-2"], theta, atol=1e-9)

    same = compare_bonded(reference, reference[::-1], [(0, 1), (1, 2)])  # same frames, other order
    assert max(same["w1"].values()) < 1e-12
    # a distribution shifted by delta is W1 = |delta| away; the untouched terms stay at 0
    moved = compare_bonded(reference, chain(r1 + 0.003, r2, theta - 4.0), [(0, 1), (1, 2)])
    assert moved["w1"]["bond 0-1"] == pytest.approx(0.003, abs=1e-12)
    assert moved["w1"]["bond 1-2"] < 1e-12
    assert moved["w1"]["angle 0-1-2"] == pytest.approx(4.0, abs=1e-9)
    assert moved["bonds_w1_worst"] == "bond 0-1" and moved["angles_w1_max_deg"] == pytest.approx(4.0)
    # a broader distribution with the same mean is caught too (a phi/psi surface would not see it)
    broad = compare_bonded(reference, chain(0.38 + 3 * (r1 - 0.38), r2, theta), [(0, 1), (1, 2)])
    assert broad["w1"]["bond 0-1"] > 0.01


def test_wrong_shape_and_bonds_are_one_line_errors(tmp_path):
    x = np.zeros((4, 3, 3))
    with pytest.raises(FlowforceError, match=r"positions must be \(frames, 3, 3\)"):
        bonded_terms(np.zeros((4, 2, 3)), BeadGraph.from_bonds(3, [(0, 1)]))
    with pytest.raises(FlowforceError, match="do not join two different beads"):
        compare_bonded(x, x, [(0, 3)])


def test_bonds_come_from_the_cg_pdb(tmp_path, alanine_md):
    from openmm_flowforce.coordinates.cg_mapping import CGMapping

    mapping = CGMapping.from_topology(alanine_md["topology"], "backbone")
    mapping.write_pdb(tmp_path / "cg.pdb", mapping.map_positions(alanine_md["positions"][:1])[0])
    assert bonds_of_pdb(tmp_path / "cg.pdb") == [(0, 1), (1, 2), (2, 3), (3, 4)]
