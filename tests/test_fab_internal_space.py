"""FAB's HMC on standardised internal coordinates (``ais_space: internal``, issue 13 §3).

The maps x → z → u against :meth:`InternalCoordinates.to_unit`, their log-determinants
against autograd, the physical-range mask, the z-space densities against the Cartesian ones
(same AIS weights), and a FAB step on alanine dipeptide's OpenMM energy in that space.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from openmm_flowforce.errors import FlowforceError
from openmm_flowforce.samplers import get_method
from openmm_flowforce.samplers.common import import_methods, make_target
from openmm_flowforce.samplers.fab import fab_internal_log_densities, fab_log_densities
from openmm_flowforce.samplers.flow_training import INTERNAL_AIS_STEP_SIZE, resolve_options

import_methods()


@pytest.fixture(scope="module")
def vacuum():
    return make_target("alanine-dipeptide")


@pytest.fixture(scope="module")
def model(vacuum):
    method = get_method("fab")
    return method.build(vacuum, method.options({"n_layers": 2, "hidden": 32, "n_components": 4}))


def _frames(target, n: int, sigma: float = 0.004, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.as_tensor(target.positions[None] + sigma * rng.standard_normal((n, target.n_atoms, 3)))


def test_standard_coordinates_compose_to_the_unit_cube_map(vacuum, model):
    """to_unit = standard_to_unit ∘ to_standard, values and log-determinants (float64)."""
    ic = model.generator.coordinates
    x = _frames(vacuum, 6)
    u, ladj = ic.to_unit(x)
    z, ladj_z = ic.to_standard(x)
    u2, ladj_u = ic.standard_to_unit(z)
    torch.testing.assert_close(u2, u, atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj_z + ladj_u, ladj, atol=1e-9, rtol=0)
    # circles carry the torsion in radians, the rest are of thermal size at these frames
    periodic = torch.tensor(ic.periodic)
    assert float(z[:, periodic].abs().max()) <= math.pi
    assert float(z[:, ~periodic].abs().max()) < 10.0


def test_standard_to_unit_log_determinant_is_autograds(vacuum, model):
    """The map is elementwise: its ladj is Σ log|du_i/dz_i| of the autograd Jacobian's diagonal,
    off-diagonal entries are zero; also for circle values outside [−π, π)."""
    ic = model.generator.coordinates
    z = ic.to_standard(_frames(vacuum, 3))[0]
    z[:, -1] += 2.0 * math.pi  # a circle (the last torsion is phi/psi-like or a rotor) one turn on
    for row in z:
        jac = torch.autograd.functional.jacobian(lambda v: ic.standard_to_unit(v[None])[0][0], row)
        assert float((jac - torch.diag(torch.diagonal(jac))).abs().max()) == 0.0
        expected = torch.diagonal(jac).abs().log().sum()
        torch.testing.assert_close(ic.standard_to_unit(row[None])[1][0], expected, atol=1e-10, rtol=0)


def test_from_standard_inverts_to_standard_with_the_opposite_log_determinant(vacuum, model):
    ic = model.generator.coordinates
    x = _frames(vacuum, 5, seed=1)
    z, ladj = ic.to_standard(x)
    y, ladj_back, valid = ic.from_standard(z)
    assert bool(valid.all())
    torch.testing.assert_close(ic.to_standard(y)[0], z, atol=1e-10, rtol=0)
    torch.testing.assert_close(ladj_back, -ladj, atol=1e-10, rtol=0)
    # same shape: all interatomic distances agree (y is x in the canonical frame)
    torch.testing.assert_close(torch.cdist(y, y), torch.cdist(x, x), atol=1e-10, rtol=0)
    # a whole turn of every circle torsion changes nothing
    turned = z + 2.0 * math.pi * torch.tensor(ic.periodic, dtype=z.dtype)
    torch.testing.assert_close(ic.from_standard(turned)[0], y, atol=1e-10, rtol=0)


def test_from_standard_marks_values_outside_the_physical_range(vacuum, model):
    ic = model.generator.coordinates
    n = ic.n_atoms
    z = ic.to_standard(_frames(vacuum, 1))[0].repeat(4, 1)
    z[0, 0] = -float(ic.bond_loc[0] / ic.bond_scale[0]) - 1.0  # bond length < 0
    z[1, n - 1] = float((1.0 - ic.cos_loc[0]) / ic.cos_scale[0]) + 0.5  # cos θ > 1
    narrow = int(ic.narrow_torsions[0])
    z[2, 2 * n - 3 + narrow] = 1.01 * math.pi / float(ic.torsion_scale[narrow])  # past the antipode
    x, ladj, valid = ic.from_standard(z)
    assert valid.tolist() == [False, False, False, True]
    assert torch.isfinite(x).all() and torch.isfinite(ladj).all()
    with pytest.raises(FlowforceError, match="expected z of shape"):
        ic.from_standard(z[:, :-1])


def test_the_flow_density_on_z_is_the_cartesian_one_times_the_jacobian(vacuum, model):
    x = _frames(vacuum, 6, seed=2).reshape(6, -1)
    z = model.to_standard(x)
    ladj = model.generator.coordinates.to_standard(x.reshape(6, -1, 3))[1]
    with torch.no_grad():
        torch.testing.assert_close(model.log_prob_standard(z), model.log_prob(x) - ladj, atol=1e-9, rtol=0)


def test_fab_densities_in_z_give_the_cartesian_weights(vacuum, model):
    """Both densities pick up the same Jacobian: log π₁ − log π₀ = 2(log p − log q) agrees with
    the Cartesian run's at the same configurations; gradients are finite and match autograd
    of the z-space densities written out here; an invalid z gets −∞ and zero gradients."""
    torch.manual_seed(0)
    with torch.no_grad():
        x = model.sample(8)
    z = model.to_standard(x)
    log_q_z, log_g_z, grad_q, grad_g = fab_internal_log_densities(model, vacuum.energy)(z)
    log_q_x, log_g_x, _, _ = fab_log_densities(model, vacuum.energy)(model.from_standard(z)[0])
    torch.testing.assert_close(log_g_z - log_q_z, log_g_x - log_q_x, atol=1e-6, rtol=1e-9)
    zz = z.clone().requires_grad_(True)
    xx, log_jac, _ = model.from_standard(zz)
    log_p = log_jac - vacuum.energy(xx)
    (expected,) = torch.autograd.grad((2.0 * log_p - model.log_prob_standard(zz)).sum(), zz)
    torch.testing.assert_close(grad_g, expected, atol=1e-8, rtol=1e-8)
    assert torch.isfinite(grad_q).all()
    bad = z[:1].clone()
    bad[0, 0] = -1e3
    out = fab_internal_log_densities(model, vacuum.energy)(bad)
    assert out[0].item() == -math.inf and out[1].item() == -math.inf
    assert float(out[2].abs().max()) == 0.0 and float(out[3].abs().max()) == 0.0


def test_ais_space_resolves_per_flow_and_refuses_the_wrong_flow(vacuum):
    method = get_method("fab")
    opts = resolve_options(method.options({}), vacuum)
    assert opts["ais_space"] == "internal" and opts["step_size"] == INTERNAL_AIS_STEP_SIZE
    opts = resolve_options(method.options({"ais_space": "cartesian"}), vacuum)
    assert opts["step_size"] == 0.001
    opts = resolve_options(method.options({"step_size": 0.2}), vacuum)
    assert opts["ais_space"] == "internal" and opts["step_size"] == 0.2
    assert resolve_options(method.options({}), make_target("dw4"))["ais_space"] == "cartesian"
    with pytest.raises(FlowforceError, match="ais_space: internal needs flow: internal"):
        resolve_options(method.options({"ais_space": "internal"}), make_target("dw4"))
    with pytest.raises(FlowforceError, match="ais_space"):
        method.options({"ais_space": "latent"})


def test_internal_space_ais_moves_the_molecule_at_unit_scale_and_keeps_log_q(vacuum, model, tmp_path):
    """One FAB step with AIS in z on the OpenMM energy: the HMC accepts at the initial step,
    the final samples have moved, their cached log q is the flow's log q of the Cartesian
    samples the buffer stores, and the energy evaluations are counted as in Cartesian space."""
    from openmm_flowforce.samplers.flow_training import EnergyCounter, TrainContext

    method = get_method("fab")
    opts = resolve_options(method.options({"n_layers": 2, "hidden": 32, "n_components": 4, "batch_size": 16,
                                           "min_buffer": 16, "buffer_size": 64, "n_intermediate": 1,
                                           "n_leapfrog": 3}), vacuum)
    extra = method.init_extra(model, vacuum, opts)
    energy = EnergyCounter(vacuum)
    ctx = TrainContext(model, energy, torch.optim.Adam(model.parameters(), lr=1e-4), opts, extra)
    torch.manual_seed(3)
    result, log_q = method.run_ais(ctx, 16, adapt=False)
    assert result.x.shape == (16, 66)
    assert float(result.accept.min()) > 0.2
    with torch.no_grad():
        torch.testing.assert_close(log_q, model.log_prob(result.x), atol=1e-6, rtol=0)
    assert torch.isfinite(result.log_w).all()
    assert energy.count == 16 * (1 + 2 * 3)
    metrics = method.train_step(ctx)
    assert math.isfinite(metrics["loss"]) and metrics["buffer_size"] == 32.0
