"""OpenMM energy target on analytic toys, in real OpenMM Contexts (Reference platform)."""
from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openmm
import pytest
import torch

import openmm_flowforce
from openmm_flowforce.conventions import kT
from openmm_flowforce.targets import OpenMMEnergy, get_target, register_target, target_names

T = 300.0
BOND_K = 1000.0  # kJ/mol/nm²
BOND_R0 = 0.15  # nm


def external_system(expression: str, n: int = 1) -> openmm.System:
    """n particles, each under CustomExternalForce(expression) in kJ/mol."""
    system = openmm.System()
    force = openmm.CustomExternalForce(expression)
    for i in range(n):
        system.addParticle(1.0)
        force.addParticle(i, [])
    system.addForce(force)
    return system


def bond_system() -> openmm.System:
    """Two particles joined by E = ½ k (r − r0)²."""
    system = openmm.System()
    system.addParticle(1.0)
    system.addParticle(1.0)
    force = openmm.HarmonicBondForce()
    force.addBond(0, 1, BOND_R0, BOND_K)
    system.addForce(force)
    return system


def bond_energy(x: np.ndarray) -> np.ndarray:
    r = np.linalg.norm(x[:, 1] - x[:, 0], axis=-1)
    return 0.5 * BOND_K * (r - BOND_R0) ** 2


def random_bonds(b: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(b, 2, 3, generator=g, dtype=torch.float64)


@pytest.fixture(scope="module")
def bond_energy_fn():
    with OpenMMEnergy(bond_system(), T) as energy:
        yield energy


def test_external_force_energy_and_gradient():
    energy = OpenMMEnergy(external_system("x"), T)
    x = torch.randn(7, 1, 3, dtype=torch.float64, requires_grad=True)
    u = energy(x)
    assert u.shape == (7,)
    torch.testing.assert_close(u, x[:, 0, 0] / kT(T), rtol=1e-12, atol=0)
    (grad,) = torch.autograd.grad(u.sum(), x)
    expected = torch.zeros_like(x)
    expected[:, 0, 0] = 1.0 / kT(T)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=0)


def test_bond_matches_analytic_energy_and_forces(bond_energy_fn):
    x = random_bonds(16)
    u = bond_energy_fn(x)
    np.testing.assert_allclose(u.numpy(), bond_energy(x.numpy()) / kT(T), rtol=1e-12)
    e, f = bond_energy_fn.energies_and_forces(x.numpy())
    assert e.shape == (16,) and f.shape == (16, 2, 3) and e.dtype == f.dtype == np.float64
    d = x.numpy()[:, 1] - x.numpy()[:, 0]
    r = np.linalg.norm(d, axis=-1, keepdims=True)
    f1 = -BOND_K * (r - BOND_R0) * d / r  # force on particle 1
    np.testing.assert_allclose(f, np.stack([-f1, f1], axis=1), rtol=1e-10, atol=1e-10)


def test_bond_gradient_against_finite_differences(bond_energy_fn):
    x = random_bonds(3, seed=1).requires_grad_(True)
    (grad,) = torch.autograd.grad(bond_energy_fn(x).sum(), x)
    h = 1e-6
    numeric = torch.zeros_like(grad)
    with torch.no_grad():
        for index in np.ndindex(*x.shape[1:]):
            step = torch.zeros_like(x)
            step[(slice(None),) + index] = h
            numeric[(slice(None),) + index] = (bond_energy_fn(x + step) - bond_energy_fn(x - step)) / (2 * h)
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-6 * grad.abs().max().item())
    assert torch.autograd.gradcheck(bond_energy_fn, (x,), eps=1e-6, atol=1e-6, rtol=1e-6)


def test_batch_shapes_dtypes_and_no_grad_path(bond_energy_fn):
    for b in (0, 1, 5):
        x = random_bonds(b).float()
        u = bond_energy_fn(x)
        assert u.shape == (b,) and u.dtype == torch.float32 and u.device == x.device
    x = random_bonds(4).float().requires_grad_(True)
    u = bond_energy_fn(x)
    u.sum().backward()
    assert x.grad.dtype == torch.float32 and x.grad.shape == x.shape
    with torch.no_grad():
        assert bond_energy_fn(x).grad_fn is None


def test_double_backward_fails_loudly(bond_energy_fn):
    x = random_bonds(3).requires_grad_(True)
    (grad,) = torch.autograd.grad(bond_energy_fn(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        grad.pow(2).sum().backward()


def test_wrong_atom_count_and_nan_frames_are_named(bond_energy_fn):
    with pytest.raises(ValueError, match="3 particles but the System has 2"):
        bond_energy_fn(torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match=r"shape \(B, N, 3\)"):
        bond_energy_fn(torch.zeros(2, 3))
    x = random_bonds(5)
    x[2, 1, 0] = float("nan")
    x[4, 0, 2] = float("inf")
    with pytest.raises(ValueError, match="frame 2 .*2 such frame\\(s\\): 2, 4"):
        bond_energy_fn(x)
    with pytest.raises(ValueError, match="frame 2"):
        bond_energy_fn.energies_and_forces(x.numpy())


def test_nonfinite_energy_zeroes_that_frames_gradient():
    # E = 1/x: +inf at x = 0 with an infinite force there.
    energy = OpenMMEnergy(external_system("1/x"), T)
    x = torch.tensor([[[0.5, 0.0, 0.0]], [[0.0, 0.0, 0.0]], [[2.0, 0.0, 0.0]]], dtype=torch.float64,
                     requires_grad=True)
    with pytest.warns(RuntimeWarning, match="1 of 3 frames"):
        u = energy(x)
    assert energy.last_nonfinite == 1 and energy.last_nonfinite_frames.tolist() == [1]
    assert not torch.isfinite(u[1]) and torch.isfinite(u[[0, 2]]).all()
    # Masking the bad frame out of the loss leaves finite gradients everywhere.
    loss = torch.where(torch.isfinite(u), u, torch.zeros_like(u)).sum()
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all() and (grad[1] == 0).all()
    torch.testing.assert_close(grad[[0, 2], 0, 0], -x[[0, 2], 0, 0].detach() ** -2 / kT(T), rtol=1e-12, atol=0)
    e, f = energy.energies_and_forces(x.detach().numpy())
    assert energy.last_nonfinite == 1 and not np.isfinite(f[1]).all()  # raw values for numpy callers
    energy(x[[0, 2]])
    assert energy.last_nonfinite == 0


def test_periodic_box_vectors_per_call():
    # Squared distance to the origin's nearest periodic image: the box matters.
    system = external_system("periodicdistance(x, y, z, 0, 0, 0)^2")
    system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row) for row in np.eye(3)))
    energy = OpenMMEnergy(system, T)
    x = torch.tensor([[[0.8, 0.0, 0.0]]], dtype=torch.float64)
    to_kj = kT(T)
    assert energy(x).item() * to_kj == pytest.approx(0.04, rel=1e-12)
    assert energy(x, box_vectors=2.0 * np.eye(3)).item() * to_kj == pytest.approx(0.64, rel=1e-12)
    assert energy(x).item() * to_kj == pytest.approx(0.04, rel=1e-12)  # back to the default box
    boxes = torch.stack([torch.eye(3), 2.0 * torch.eye(3)]).double()
    e, _ = energy.energies_and_forces(x.repeat(2, 1, 1).numpy(), box_vectors=boxes)
    np.testing.assert_allclose(e, [0.04, 0.64], rtol=1e-12)
    with pytest.raises(ValueError, match="does not use periodic"):
        OpenMMEnergy(external_system("x"), T)(x, box_vectors=np.eye(3))
    with pytest.raises(ValueError, match=r"\(3, 3\) or \(1, 3, 3\)"):
        energy(x, box_vectors=np.eye(2))


def test_reverse_kl_style_gradients_flow_through_the_target():
    # u = |x|²/kT; x = mu + sigma·z is a differentiable sample, so d mean(u)/d mu = 2 mean(x)/kT.
    energy = OpenMMEnergy(external_system("x^2 + y^2 + z^2", n=2), T)
    mu = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64, requires_grad=True)
    log_sigma = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    z = torch.randn(32, 2, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = mu + log_sigma.exp() * z
    loss = energy(x).mean() - log_sigma.sum()
    loss.backward()
    expected_mu = 2.0 * x.detach().sum(1).mean(0) / kT(T)
    expected_log_sigma = 2.0 * (x.detach() * z).sum(1).mean(0) / kT(T) - 1.0
    torch.testing.assert_close(mu.grad, expected_mu, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(log_sigma.grad, expected_log_sigma, rtol=1e-12, atol=1e-15)


def test_bad_arguments_are_rejected_by_name():
    with pytest.raises(ValueError, match="unknown OpenMM platform 'Nope'; available: .*Reference"):
        OpenMMEnergy(bond_system(), T, platform="Nope")
    with pytest.raises(ValueError, match="unknown property 'Bogus'"):
        OpenMMEnergy(bond_system(), T, platform_properties={"Bogus": "1"})
    with pytest.raises(ValueError, match="n_workers"):
        OpenMMEnergy(bond_system(), T, n_workers=-1)
    with pytest.raises(ValueError, match="temperature"):
        OpenMMEnergy(bond_system(), -1.0)
    closed = OpenMMEnergy(bond_system(), T)
    closed.close()
    with pytest.raises(RuntimeError, match="closed"):
        closed(random_bonds(1))


def test_registry():
    assert "openmm" in target_names()
    energy = get_target("openmm", system=bond_system(), temperature=T)
    assert isinstance(energy, OpenMMEnergy) and energy.kT == pytest.approx(kT(T))
    with pytest.raises(ValueError, match="unknown target 'nope'; valid names: .*openmm"):
        get_target("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_target("openmm", OpenMMEnergy)
    with pytest.raises(TypeError, match="callable"):
        register_target("not-callable", 3)


def _new_children(before: set) -> list:
    return [p for p in multiprocessing.active_children() if p not in before]


def test_parallel_equals_serial_and_close_ends_workers(bond_energy_fn):
    x = random_bonds(11, seed=5).requires_grad_(True)
    u_serial = bond_energy_fn(x)
    (g_serial,) = torch.autograd.grad(u_serial.sum(), x)
    before = set(multiprocessing.active_children())
    with OpenMMEnergy(bond_system(), T, n_workers=2) as parallel:
        workers = _new_children(before)
        assert len(workers) == 2 and all(p.is_alive() and p.daemon for p in workers)
        u_parallel = parallel(x)
        (g_parallel,) = torch.autograd.grad(u_parallel.sum(), x)
        assert torch.equal(u_parallel, u_serial) and torch.equal(g_parallel, g_serial)
        e, f = parallel.energies_and_forces(x.detach().numpy()[:1])  # fewer frames than workers
        e_ref, f_ref = bond_energy_fn.energies_and_forces(x.detach().numpy()[:1])
        assert np.array_equal(e, e_ref) and np.array_equal(f, f_ref)
    assert not any(p.is_alive() for p in workers)
    assert not set(workers) & set(multiprocessing.active_children())
    with pytest.raises(RuntimeError, match="closed"):
        parallel(x)


def test_dropped_pool_ends_its_workers():
    before = set(multiprocessing.active_children())
    energy = OpenMMEnergy(bond_system(), T, n_workers=2)
    workers = _new_children(before)
    assert len(workers) == 2
    del energy
    gc.collect()
    assert not any(p.is_alive() for p in workers)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            return any(line.startswith("State:") and "Z" in line for line in status)
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_exit_when_their_parent_is_killed():
    script = (
        "import multiprocessing, os, signal, openmm\n"
        "from openmm_flowforce.targets import OpenMMEnergy\n"
        "s = openmm.System(); s.addParticle(1.0)\n"
        "e = OpenMMEnergy(s, 300.0, n_workers=1)\n"
        "print(*[p.pid for p in multiprocessing.active_children()], flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    root = str(Path(openmm_flowforce.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == -signal.SIGKILL, result.stderr
    pids = [int(p) for p in result.stdout.split()]
    assert len(pids) == 1
    deadline = time.monotonic() + 10.0
    while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(pid) for pid in pids)
