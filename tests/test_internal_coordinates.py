"""Internal coordinates: Z-matrix construction, round trips, invariance, exact ladj, errors."""
from __future__ import annotations

import io
import math
import os

import mdtraj as md
import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from openmm_flowforce.coordinates import InternalCoordinates, build_zmatrix
from openmm_flowforce.data import alanine_dipeptide_pdb

VILLIN_PDB = os.path.join(os.path.dirname(openmm.__file__), "app", "data", "test.pdb")


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def kabsch_rmsd_max(a: np.ndarray, b: np.ndarray) -> float:
    """Largest per-atom distance (nm) after optimally superposing b onto a (N, 3)."""
    a0, b0 = a - a.mean(0), b - b.mean(0)
    u, _, vt = np.linalg.svd(b0.T @ a0)
    d = np.sign(np.linalg.det(u @ vt))
    rot = u @ np.diag([1.0, 1.0, d]) @ vt
    return float(np.linalg.norm(b0 @ rot - a0, axis=-1).max())


@pytest.fixture(scope="module")
def alanine() -> tuple[app.Topology, np.ndarray]:
    """Topology and 8 frames (nm): the PDB, then perturbed, rotated, translated copies."""
    pdb = app.PDBFile(alanine_dipeptide_pdb())
    x = np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    rng = np.random.default_rng(0)
    frames = [x]
    for _ in range(7):
        y = x + rng.normal(scale=0.005, size=x.shape)
        frames.append(y @ random_rotation(rng).T + rng.normal(size=3))
    return pdb.topology, np.stack(frames)


@pytest.fixture(scope="module")
def villin() -> md.Trajectory:
    assert os.path.exists(VILLIN_PDB), f"OpenMM's villin test structure is missing at {VILLIN_PDB}"
    traj = md.load(VILLIN_PDB)
    return traj.atom_slice(traj.topology.select("protein"))


def test_alanine_pdb_loads_and_is_parametrised():
    pdb = app.PDBFile(alanine_dipeptide_pdb())
    assert pdb.topology.getNumAtoms() == 22
    assert [r.name for r in pdb.topology.residues()] == ["ACE", "ALA", "NME"]
    system = app.ForceField("amber14-all.xml").createSystem(pdb.topology, nonbondedMethod=app.NoCutoff)
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(pdb.positions)
    energy = ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    assert -95.0 < energy < -85.0  # committed minimum: -91.27 kJ/mol
    assert md.load(alanine_dipeptide_pdb()).topology.n_bonds == 21


@pytest.mark.parametrize("system", ["alanine", "villin"])
def test_zmatrix_references(system, alanine, villin):
    if system == "alanine":
        top = alanine[0]
        n, bonds = top.getNumAtoms(), [(b[0].index, b[1].index) for b in top.bonds()]
        elements = [a.element.symbol for a in top.atoms()]
    else:
        n, bonds = villin.n_atoms, [(b[0].index, b[1].index) for b in villin.topology.bonds]
        elements = [a.element.symbol for a in villin.topology.atoms]
    rows = build_zmatrix(n, bonds, elements).rows
    bonded = {frozenset(b) for b in bonds}
    assert sorted(rows[:, 0]) == list(range(n))
    assert elements[rows[0, 0]] != "H" and elements[rows[1, 0]] != "H"
    placed = {int(rows[0, 0])}
    for p, (i, j, k, l) in enumerate(rows.tolist()):
        refs = [r for r in (j, k, l) if r >= 0]
        assert len(refs) == min(p, 3) and len(set(refs + [i])) == len(refs) + 1
        assert set(refs) <= placed
        if p >= 1:
            assert frozenset((i, j)) in bonded
        if p >= 2:
            assert frozenset((j, k)) in bonded
        placed.add(i)


def test_disconnected_graph_names_fragments(villin):
    traj = md.load(VILLIN_PDB)
    with_water = traj.atom_slice(np.concatenate([villin.topology.select("all"), traj.topology.select("water")[:6]]))
    with pytest.raises(ValueError, match=r"not connected: it has 3 fragments.*HOH.*one InternalCoordinates per molecule"):
        InternalCoordinates.from_topology(with_water.topology)
    with pytest.raises(ValueError, match="at least 3 atoms"):
        build_zmatrix(2, [(0, 1)])


def test_dim_and_periodic(alanine):
    ic = InternalCoordinates.from_topology(alanine[0])
    n = 22
    assert ic.n_atoms == n and ic.dim == 3 * n - 6 == len(ic.periodic)
    assert ic.periodic == [False] * (2 * n - 3) + [True] * (n - 3)
    bonds, angles, torsions = ic.to_internal(torch.as_tensor(alanine[1]))
    assert bonds.shape == (8, n - 1) and angles.shape == (8, n - 2) and torsions.shape == (8, n - 3)
    assert angles.min() >= 0 and angles.max() <= math.pi
    assert torsions.min() >= -math.pi and torsions.max() < math.pi


def test_to_internal_matches_mdtraj(alanine):
    top, x = alanine
    ic = InternalCoordinates.from_topology(top)
    traj = md.Trajectory(x, md.Topology.from_openmm(top))
    rows = ic.rows.numpy()
    bonds, angles, torsions = (v.numpy() for v in ic.to_internal(torch.as_tensor(x)))
    # mdtraj computes in float32.
    np.testing.assert_allclose(bonds, md.compute_distances(traj, rows[1:, :2]), atol=1e-6)
    np.testing.assert_allclose(angles, md.compute_angles(traj, rows[2:, :3]), atol=1e-5)
    diff = torsions - md.compute_dihedrals(traj, rows[3:])
    np.testing.assert_allclose(np.angle(np.exp(1j * diff)), 0.0, atol=1e-5)


def test_round_trip_alanine(alanine):
    top, x = alanine
    ic = InternalCoordinates.from_topology(top, x)
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):  # measured 1.2e-7, 5e-16
        xt = torch.as_tensor(x, dtype=dtype)
        u, ladj = ic.to_unit(xt)
        assert u.dtype == dtype and ((u > 0) & (u < 1)).all()
        y, ladj_inv = ic.from_unit(u)
        errors = [kabsch_rmsd_max(x[t], y[t].double().numpy()) for t in range(len(x))]
        assert max(errors) < tol, (dtype, errors)
        torch.testing.assert_close(ladj_inv, -ladj, rtol=0, atol=1e-3 if dtype == torch.float32 else 1e-10)
    u = torch.as_tensor(ic.to_unit(torch.as_tensor(x))[0])
    torch.testing.assert_close(ic.to_unit(ic.from_unit(u)[0])[0], u, rtol=0, atol=1e-12)


def test_rigid_motion_invariance(alanine):
    top, x = alanine
    ic = InternalCoordinates.from_topology(top, x)
    rng = np.random.default_rng(1)
    y = np.stack([f @ random_rotation(rng).T + rng.normal(scale=3.0, size=3) for f in x])
    u, ladj = ic.to_unit(torch.as_tensor(x))
    v, ladj_y = ic.to_unit(torch.as_tensor(y))
    torch.testing.assert_close(v, u, rtol=0, atol=1e-10)
    torch.testing.assert_close(ladj_y, ladj, rtol=0, atol=1e-10)


def test_ladj_matches_autograd_jacobian(alanine):
    """In the canonical frame the 3N−6 free coordinates are z of row 1, (x, z) of row 2 and
    xyz of rows ≥ 3. Their volume element is b₂ · Π_{i≥3} b_i² sin θ_i, which is the
    rigid-body-reduced Jacobian J = b₁² · Π_{i≥2} b_i² sin θ_i divided by b₁² b₂ sin θ₂, so
    log|det d(free)/du| = ladj(from_unit) − log(b₁² b₂ sin θ₂)."""
    top, x = alanine
    ic = InternalCoordinates.from_topology(top, x)
    order = ic.rows[:, 0]

    def free(u_vec):
        placed = ic.from_unit(u_vec[None])[0][0][order]
        return torch.cat([placed[1, 2:], placed[2, [0, 2]], placed[3:].reshape(-1)])

    u_all, _ = ic.to_unit(torch.as_tensor(x))
    for u in u_all[:4]:
        jac = torch.autograd.functional.jacobian(free, u)
        sign, logdet = torch.linalg.slogdet(jac)
        y, ladj = ic.from_unit(u[None])
        bonds, angles, _ = ic.to_internal(y)
        rigid = torch.log(bonds[0, 0] ** 2 * bonds[0, 1] * torch.sin(angles[0, 0]))
        assert sign != 0
        torch.testing.assert_close(logdet, ladj[0] - rigid, rtol=0, atol=1e-8)


def test_linear_angle_is_finite():
    ic = InternalCoordinates(build_zmatrix(4, [(0, 1), (1, 2), (2, 3)], ["O", "C", "C", "H"]))
    x = torch.tensor([[[0.0, 0.0, 0.0], [0.12, 0.0, 0.0], [0.25, 0.0, 0.0], [0.3, 0.1, 0.0]]], requires_grad=True)
    rows = ic.rows.tolist()
    assert rows[0][0] in (1, 2)  # a central heavy atom is the root
    _, ladj = ic.to_unit(x)
    (grad,) = torch.autograd.grad(ladj.sum(), x, create_graph=True)
    (hess_row,) = torch.autograd.grad(grad[0, 0, 0], x)
    assert torch.isfinite(ladj).all() and torch.isfinite(grad).all() and torch.isfinite(hess_row).all()
    u = torch.full((1, ic.dim), 0.5)
    u[0, 3] = 1e-30  # an angle far below the cos range: clamped to cos θ = −1
    y, ladj_y = ic.from_unit(u)
    assert torch.isfinite(y).all() and torch.isfinite(ladj_y).all()


def test_double_backward(alanine):
    top, x = alanine
    ic = InternalCoordinates.from_topology(top, x)
    xt = torch.as_tensor(x[1:2]).clone().requires_grad_(True)

    def f(pos):
        u, ladj = ic.to_unit(pos, check=False)
        return u[:, : 2 * 22 - 3].sum(-1) + ladj  # bonds and angles: smooth everywhere

    assert torch.autograd.gradgradcheck(f, (xt,))


def test_state_dict_round_trip_and_defaults(alanine):
    top, x = alanine
    fitted = InternalCoordinates.from_topology(top, x)
    buf = io.BytesIO()
    torch.save(fitted.state_dict(), buf)
    buf.seek(0)
    fresh = InternalCoordinates.from_topology(top)  # physics defaults
    u_default = fresh.to_unit(torch.as_tensor(x))[0]
    assert ((u_default > 0) & (u_default < 1)).all()
    fresh.load_state_dict(torch.load(buf))
    for a, b in zip(fresh.to_unit(torch.as_tensor(x)), fitted.to_unit(torch.as_tensor(x))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    quantity = app.PDBFile(alanine_dipeptide_pdb()).getPositions(asNumpy=True)
    InternalCoordinates.from_topology(top, quantity)  # OpenMM Quantity positions


def test_villin_round_trip(villin):
    x = villin.xyz.astype(np.float64)
    ic = InternalCoordinates.from_topology(villin.topology, x)
    omm = app.PDBFile(VILLIN_PDB)
    modeller = app.Modeller(omm.topology, omm.positions)
    modeller.delete([r for r in modeller.topology.residues() if r.name in ("HOH", "Cl")])
    ic_omm = InternalCoordinates.from_topology(modeller.topology, x)
    assert ic_omm.n_atoms == ic.n_atoms == villin.n_atoms and ic.dim == 3 * villin.n_atoms - 6
    errors = {}
    for dtype in (torch.float32, torch.float64):
        u, ladj = ic.to_unit(torch.as_tensor(x, dtype=dtype))
        y, ladj_inv = ic.from_unit(u)
        errors[dtype] = kabsch_rmsd_max(x[0], y[0].double().numpy())
    # measured 3.9e-15 and 1.3e-6 nm (582 atoms, 56 placement levels)
    assert errors[torch.float64] < 1e-11 and errors[torch.float32] < 1e-5, errors


def test_bad_inputs(alanine):
    top, x = alanine
    ic = InternalCoordinates.from_topology(top, x)
    xt = torch.as_tensor(x)
    with pytest.raises(ValueError, match=r"shape \(B, 22, 3\).*got \(8, 21, 3\).*exactly its atoms"):
        ic.to_unit(xt[:, :21])
    with pytest.raises(ValueError, match=r"add a batch dimension"):
        ic.to_unit(xt[0])
    bad = xt.clone()
    bad[3, 5, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf.*frame 3, atom 5"):
        ic.to_unit(bad)
    with pytest.raises(ValueError, match="look like Ångström; OpenMM uses nm: divide by 10"):
        ic.to_internal(xt * 10.0)
    with pytest.raises(ValueError, match="look like Ångström"):
        InternalCoordinates.from_topology(top, x * 10.0)
    with pytest.raises(TypeError, match="torch.as_tensor"):
        ic.to_unit(x)
    with pytest.raises(TypeError, match="openmm.app.Topology or an mdtraj.Topology"):
        InternalCoordinates.from_topology(md.load(alanine_dipeptide_pdb()))
    with pytest.raises(ValueError, match=r"u of shape \(B, 60\)"):
        ic.from_unit(torch.rand(2, 59))
