"""The prior outlier rule of flow-matching: flow samples where the CG net's priors and the flow's
forces cannot both hold (overlapping beads) are dropped; the priors' forces it uses are exact."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("openmm")

from openmm_flowforce.errors import FlowforceError  # noqa: E402
from openmm_flowforce.potentials.priors import distances  # noqa: E402
from openmm_flowforce.training.flow_matching import (FORCE_OUTLIER_FACTOR, coarse_grain, max_bead_force_norm,  # noqa: E402
                                                     prior_forces, within_prior_forces)

T = 300.0


@pytest.fixture(scope="module")
def beads(cg):
    _, mapping, _ = cg
    return mapping


def test_prior_forces_are_minus_the_gradient_of_the_priors_alone(cg, alanine_md):
    net, mapping, _ = cg
    x = np.asarray(mapping.map_positions(alanine_md["positions"][:40]))
    forces = prior_forces(net, x, chunk=7)  # chunks that do not divide the frames
    assert forces.shape == (40, 5, 3) and forces.dtype == np.float64
    xt = torch.as_tensor(x).requires_grad_(True)
    (grad,) = torch.autograd.grad(net.prior_energy(xt).sum(), xt)
    np.testing.assert_allclose(forces, -grad.numpy(), rtol=1e-12, atol=1e-12 * np.abs(forces).max())
    # The net's own forces differ (its MLP is not zero), so these are the priors' alone.
    _, total = net.energy_and_forces(torch.as_tensor(x))
    assert np.abs(total.detach().numpy() - forces).max() > 1e-3 * np.abs(forces).max()
    # Directional finite differences: E(x − hF̂) − E(x + hF̂) ≈ 2h|F|.
    with torch.no_grad():
        for i in range(3):
            f = torch.as_tensor(forces[i])
            step = 1e-6 * f / f.norm()
            e_minus, e_plus = net.prior_energy(torch.stack([xt[i] - step, xt[i] + step]))
            assert float(e_minus - e_plus) / 2e-6 == pytest.approx(float(f.norm()), rel=1e-5)


def test_the_rule_drops_overlapping_beads_and_keeps_the_data(cg, alanine_md):
    net, mapping, _ = cg
    x = np.asarray(mapping.map_positions(alanine_md["positions"]))
    data, fresh = x[:1200], x[1200:1300].copy()
    repulsion = next(p for p in net.priors if type(p).__name__ == "Repulsion")
    i, j = repulsion.pairs[0].tolist()
    sigma = float(repulsion.sigma[0])
    # Plant overlaps: bead j moved onto bead i, 0.3 σ away, in every fourth frame.
    planted = list(range(0, 100, 4))
    for t in planted:
        direction = fresh[t, j] - fresh[t, i]
        fresh[t, j] = fresh[t, i] + 0.3 * sigma * direction / np.linalg.norm(direction)
    pair = distances(torch.as_tensor(fresh), repulsion.pairs[:1]).numpy()[:, 0]
    assert np.allclose(pair[planted], 0.3 * sigma)

    def forces_of(positions: np.ndarray) -> np.ndarray:
        return prior_forces(net, positions)

    kept, threshold = within_prior_forces(forces_of, fresh, data)
    on_data = max_bead_force_norm(forces_of(data))
    assert threshold == pytest.approx(FORCE_OUTLIER_FACTOR * np.percentile(on_data, 99.9), rel=1e-12)
    assert np.flatnonzero(~kept).tolist() == planted  # exactly the overlaps go; held-out MD frames stay
    # The rule is the threshold, nothing else: a factor that admits the worst overlap keeps all.
    worst = max_bead_force_norm(forces_of(fresh)).max()
    kept_all, _ = within_prior_forces(forces_of, fresh, data, factor=1.01 * worst / np.percentile(on_data, 99.9))
    assert kept_all.all()
    with pytest.raises(FlowforceError, match="factor"):
        within_prior_forces(forces_of, fresh, data, factor=0.0)


def test_flow_matching_reports_the_prior_and_contact_rules(beads, alanine_md, tmp_path):
    options = {"flow": {"n_layers": 2, "hidden": [16, 16], "n_components": 4}, "flow_train": {"steps": 40},
               "flow_samples": 300, "net": {"hidden": [8, 8]}, "cg_train": {"steps": 20, "validate_every": 10},
               "contact_factor": 1.0}
    positions = alanine_md["positions"][::3]
    result = coarse_grain(positions, alanine_md["topology"], T, tmp_path / "cg.ckpt", mapping=beads,
                          options=options, progress=False)
    info = result.info
    x = np.asarray(beads.map_positions(positions))
    _, threshold = within_prior_forces(lambda p: prior_forces(result.net, p), x[:10], x[:300])
    # The trained net's priors are the ones fitted before the method ran (priors are not trained).
    assert info["prior_force_threshold_kj_mol_nm"] == pytest.approx(threshold, rel=1e-12)
    assert info["contact_factor"] == 1.0 and info["dropped_by_contacts"] > 0  # the turned torsions leave the data
    assert info["dropped_by_priors"] + info["dropped_by_contacts"] <= info["dropped_samples"]
    assert info["dropped_samples"] + info["training_frames"] == 300 + info["torsion_jitter_points"]
    assert "priors' forces" in info["outlier_rule"]


def test_contact_rule_drops_frames_closer_than_the_data_ever_came(cg, alanine_md):
    from openmm_flowforce.potentials.priors import BeadGraph
    from openmm_flowforce.training.flow_samples import within_data_contacts

    _, mapping, _ = cg
    x = np.asarray(mapping.map_positions(alanine_md["positions"]))
    data, fresh = x[:1200], x[1200:1260].copy()
    far = BeadGraph.from_bonds(mapping.n_beads, mapping.bonds).nonbonded
    kept, closest = within_data_contacts(data, data, far, 1.0)
    assert kept.all() and closest.shape == (len(far),)  # the data are within their own support
    i, j = far[0]
    expected = np.linalg.norm(data[:, i] - data[:, j], axis=-1).min()
    assert closest[0] == pytest.approx(expected, rel=1e-15)
    # Plant frames whose first pair sits at 0.95 and 0.85 of its closest data distance.
    for t, fraction in ((3, 0.95), (7, 0.85)):
        direction = fresh[t, j] - fresh[t, i]
        fresh[t, j] = fresh[t, i] + fraction * expected * direction / np.linalg.norm(direction)
    for factor, dropped in ((1.0, {3, 7}), (0.9, {7}), (0.8, set())):
        kept, _ = within_data_contacts(fresh, data, far, factor)
        natural = within_data_contacts(x[1200:1260], data, far, factor)[0]  # unplanted frames decide the rest
        assert set(np.flatnonzero(~kept)) == dropped | set(np.flatnonzero(~natural)) - {3, 7}
    with pytest.raises(FlowforceError, match="contact factor"):
        within_data_contacts(fresh, data, far, 0.0)
