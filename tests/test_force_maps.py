"""Optimal force maps (coordinates/force_maps.py): valid, least-noise, blind to constraints.

The exact check: three particles joined by two zero-length harmonic springs (a real OpenMM
System), beads = the two ends. Given the ends, the middle particle is Gaussian, so the mean
force on an end is known, −k_eff (x₀ − x₂) with k_eff = k₁k₂/(k₁+k₂), and the optimal map
(weight k₁/(k₁+k₂) on the middle particle's force) removes *all* the noise: its mapped force
is that mean force frame by frame, where the basic map's scatters about it.
"""
from __future__ import annotations

import numpy as np
import openmm
import pytest
from openmm import app, unit

from openmm_flowforce.coordinates.cg_mapping import CGMapping
from openmm_flowforce.coordinates.force_maps import (FORCE_MAPS, constraint_groups, optimal_force_map,
                                                     system_constraints)
from openmm_flowforce.errors import FlowforceError

K1, K2, KT = 800.0, 200.0, 2.494  # kJ/mol/nm², kJ/mol


def _spring_frames(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Positions with the middle particle drawn from its exact conditional, and OpenMM's forces."""
    system = openmm.System()
    for _ in range(3):
        system.addParticle(12.0)
    springs = openmm.CustomBondForce("0.5*k*r^2")
    springs.addPerBondParameter("k")
    springs.addBond(0, 1, [K1])
    springs.addBond(1, 2, [K2])
    system.addForce(springs)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    rng = np.random.default_rng(seed)
    positions = np.zeros((n, 3, 3))
    positions[:, 2] = rng.normal(0.0, 0.3, (n, 3))
    mean = (K1 * positions[:, 0] + K2 * positions[:, 2]) / (K1 + K2)
    positions[:, 1] = mean + rng.normal(0.0, np.sqrt(KT / (K1 + K2)), (n, 3))
    forces = np.empty_like(positions)
    for t in range(n):
        context.setPositions(positions[t])
        forces[t] = context.getState(getForces=True).getForces(asNumpy=True).value_in_unit(
            unit.kilojoule_per_mole / unit.nanometer)
    return positions, forces


def test_the_optimal_map_recovers_the_exact_mean_force_of_a_gaussian_chain():
    positions, forces = _spring_frames(3000)
    ends = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    w = optimal_force_map(forces, ends)
    np.testing.assert_allclose(ends @ w.T, np.eye(2), atol=1e-9)
    assert w[0, 1] == pytest.approx(K1 / (K1 + K2), rel=0.02)
    assert w[1, 1] == pytest.approx(K2 / (K1 + K2), rel=0.02)
    k_eff = K1 * K2 / (K1 + K2)
    exact = -k_eff * (positions[:, 0] - positions[:, 2])
    optimal = np.einsum("Ia,tac->tIc", w, forces)[:, 0]
    basic = forces[:, 0]
    noise_basic = np.sqrt(np.mean((basic - exact) ** 2))
    noise_optimal = np.sqrt(np.mean((optimal - exact) ** 2))
    assert noise_optimal < 0.05 * noise_basic
    # The basic map is unbiased too, only noisy: its regression on the end-to-end vector gives k_eff.
    slope = -np.sum(basic * (positions[:, 0] - positions[:, 2])) / np.sum((positions[:, 0] - positions[:, 2]) ** 2)
    assert slope == pytest.approx(k_eff, rel=0.05)


def test_constrained_atoms_share_their_weights_so_constraint_forces_cancel():
    rng = np.random.default_rng(1)
    forces = rng.normal(size=(400, 5, 3)) * np.array([1.0, 3.0, 0.5, 2.0, 1.0])[None, :, None]
    beads = np.zeros((2, 5))
    beads[0, 0], beads[1, 3] = 1.0, 1.0
    w = optimal_force_map(forces, beads, constraints=[(0, 1), (3, 4)])
    np.testing.assert_allclose(beads @ w.T, np.eye(2), atol=1e-9)
    np.testing.assert_allclose(w[:, 0], w[:, 1], atol=1e-12)
    np.testing.assert_allclose(w[:, 3], w[:, 4], atol=1e-12)
    pair = np.zeros((5, 3))
    pair[0], pair[1] = [1.0, -2.0, 0.5], [-1.0, 2.0, -0.5]  # a constraint force: equal and opposite
    np.testing.assert_allclose(w @ pair, 0.0, atol=1e-12)
    assert constraint_groups(5, [(0, 1), (3, 4)]).tolist() == [0, 0, 1, 2, 2]


def test_a_constraint_across_two_beads_is_refused_in_one_line():
    beads = np.zeros((2, 3))
    beads[0, 0], beads[1, 2] = 1.0, 1.0
    with pytest.raises(FlowforceError, match=r"atoms \[0, 1, 2\] are joined by constraints") as error:
        optimal_force_map(np.ones((4, 3, 3)), beads, constraints=[(0, 1), (1, 2)])
    assert "\n" not in str(error.value)
    with pytest.raises(FlowforceError, match="outside"):
        constraint_groups(3, [(0, 7)])
    with pytest.raises(FlowforceError, match="NaN"):
        optimal_force_map(np.full((4, 3, 3), np.nan), beads)


def test_alanine_hbond_constraints_and_less_noise_on_real_md(alanine_md):
    pdb = app.PDBFile(str(__import__("openmm_flowforce.data", fromlist=["x"]).alanine_dipeptide_pdb()))
    constrained = app.ForceField("amber14-all.xml").createSystem(pdb.topology, constraints=app.HBonds)
    pairs = system_constraints(constrained)
    assert len(pairs) == constrained.getNumConstraints() == 12
    hydrogens = {a.index for a in pdb.topology.atoms() if a.element.symbol == "H"}
    assert all((i in hydrogens) != (j in hydrogens) for i, j in pairs)
    mapping = CGMapping.from_topology(alanine_md["topology"], "backbone")
    forces = alanine_md["forces"]
    w = optimal_force_map(forces[:1000], mapping.position_matrix, pairs)
    held_out = forces[1000:]
    optimal = np.einsum("Ia,tac->tIc", w, held_out)
    basic = mapping.map_forces(held_out)
    assert np.mean(optimal ** 2) < 0.8 * np.mean(basic ** 2)  # on frames the map was not fitted to
    for i, j in pairs:
        np.testing.assert_allclose(w[:, i], w[:, j], atol=1e-12)


def test_coarse_grain_force_matching_uses_the_optimal_map(alanine_md, tmp_path):
    from openmm_flowforce.training.flow_matching import coarse_grain

    quick = {"cg_train": {"steps": 20, "validate_every": 10}, "net": {"hidden": [8, 8]}}
    md = alanine_md
    result = coarse_grain(md["positions"][:150], md["topology"], 300.0, tmp_path / "o.ckpt", "backbone",
                          "force-matching", forces=md["forces"][:150], options={**quick, "force_map": "optimal"},
                          progress=False, constraints=[])
    assert result.info["force_map"] == "optimal"
    assert result.info["force_map_rms_ratio"] < 0.95
    assert result.info["cg_loss_kind"] == "internal"  # cg_loss.kind auto, for force matching
    unknown = coarse_grain(md["positions"][:150], md["topology"], 300.0, tmp_path / "u.ckpt", "backbone",
                           "force-matching", forces=md["forces"][:150],
                           options={**quick, "cg_loss": {"kind": "cartesian"}}, progress=False)
    assert unknown.info["force_map"] == "basic" and "force_map_rms_ratio" not in unknown.info  # auto, no constraints
    assert unknown.info["cg_loss_kind"] == "cartesian"
    with pytest.raises(FlowforceError, match="force_map: optimal maps all-atom forces for --method force-matching"):
        coarse_grain(md["positions"][:50], md["topology"], 300.0, tmp_path / "f.ckpt", "backbone", "flow-matching",
                     options={"force_map": "optimal"}, progress=False)
    assert not (tmp_path / "f.ckpt").exists()


def test_cli_force_map_needs_the_system_and_keeps_the_library_choices(alanine_md, tmp_path, capsys):
    from openmm_flowforce.cli import cg as cg_cli
    from openmm_flowforce.cli.main import main
    from openmm_flowforce.data.dataset import save_dataset

    assert cg_cli.FORCE_MAPS == ("auto",) + FORCE_MAPS
    md = alanine_md
    save_dataset(tmp_path / "nosys.npz", topology=md["topology"], positions=md["positions"][:40],
                 energies=np.zeros(40), temperature=300.0, forces=md["forces"][:40])
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["cg", str(tmp_path / "nosys.npz"), "--method", "force-matching", "--force-map", "optimal",
                 "--quick", "--quiet", "--out", str(tmp_path / "o.ckpt")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--force-map optimal needs the System" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # auto (the default) falls back to the basic map without the System, and says which it used
    assert main(["cg", str(tmp_path / "nosys.npz"), "--method", "force-matching", "--quick", "--quiet",
                 "--out", str(tmp_path / "a.ckpt")]) == 0
    assert "basic force map" in capsys.readouterr().out
