"""FAB on alanine dipeptide from the energy alone (issue 13 §3): target, flow, CLI, evaluation."""
from __future__ import annotations

import json
import math

import numpy as np
import openmm
import pytest
import torch
from openmm import unit

from openmm_flowforce.samplers.common import import_methods, load_sampler, make_target
from openmm_flowforce.targets.molecules import builtin_molecule_system, lin_log_cut

KJ, KJ_NM = unit.kilojoule_per_mole, unit.kilojoule_per_mole / unit.nanometer


@pytest.fixture(scope="module")
def vacuum():
    return make_target("alanine-dipeptide")


def _perturbed(target, n: int, sigma: float = 0.003, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return target.positions[None] + sigma * rng.standard_normal((n, target.n_atoms, 3))


@pytest.mark.parametrize("name", ["alanine-dipeptide", "alanine-dipeptide-implicit"])
def test_target_energies_and_forces_match_a_plain_context(name):
    """u = E/kT and du/dx = −F/kT against an OpenMM Context of the same System built here."""
    target = make_target(name)
    topology, system, _ = builtin_molecule_system("alanine-dipeptide",
                                                  "implicit" if name.endswith("implicit") else "vacuum")
    platform = openmm.Platform.getPlatformByName(target.openmm_energy.platform)
    properties = {"Threads": "1"} if platform.getName() == "CPU" else {}
    context = openmm.Context(system, openmm.VerletIntegrator(1e-3), platform, properties)
    frames = _perturbed(target, 4)
    x = torch.as_tensor(frames.reshape(4, -1)).requires_grad_(True)
    u = target.energy(x)
    (grad,) = torch.autograd.grad(u.sum(), x)
    for i, frame in enumerate(frames):
        context.setPositions(frame)
        state = context.getState(getEnergy=True, getForces=True)
        energy = state.getPotentialEnergy().value_in_unit(KJ)
        forces = state.getForces(asNumpy=True).value_in_unit(KJ_NM)
        assert float(u[i].detach()) * target.kT == pytest.approx(energy, rel=1e-9, abs=1e-9)
        np.testing.assert_allclose(-grad[i].numpy().reshape(-1, 3) * target.kT, forces, rtol=1e-9, atol=1e-7)
    assert math.isclose(target.kT, 2.494338785445972, rel_tol=1e-9)  # 300 K


@pytest.mark.parametrize("solvent", ["vacuum", "implicit"])
def test_target_system_is_the_one_flowforce_md_simulates(solvent):
    """The reference MD (``flowforce md --system alanine-dipeptide``) and the target share one System."""
    from openmm_flowforce.md.systems import load_system

    _, md_system, md_positions = load_system(system="alanine-dipeptide", solvent=solvent)
    _, system, positions = builtin_molecule_system("alanine-dipeptide", solvent)
    np.testing.assert_allclose(positions, md_positions, atol=1e-12)
    frames = _perturbed_positions(positions, 3)
    energies = []
    for s in (md_system, system):
        context = openmm.Context(s, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference"))
        row = []
        for frame in frames:
            context.setPositions(frame)
            row.append(context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(KJ))
        energies.append(row)
    np.testing.assert_allclose(energies[0], energies[1], rtol=1e-12, atol=1e-9)


def _perturbed_positions(positions: np.ndarray, n: int) -> np.ndarray:
    return positions[None] + 0.005 * np.random.default_rng(1).standard_normal((n, *positions.shape))


def test_lin_log_cut_is_identity_below_and_logarithmic_above():
    u = torch.tensor([-5.0, 10.0, 99.999, 100.0, 101.0, 1e30, math.inf, math.nan], dtype=torch.float64)
    reg = lin_log_cut(u, cut=100.0, maximum=1e3)
    assert torch.equal(reg[:4], u[:4])
    assert float(reg[4]) == pytest.approx(100.0 + math.log(2.0), rel=1e-12)
    assert float(reg[5]) == pytest.approx(100.0 + math.log1p(1e30 - 100.0), rel=1e-12)
    assert torch.equal(reg[6:], torch.full((2,), 1e3, dtype=torch.float64))
    # C¹ at the cut: slope 1 on both sides.
    x = torch.tensor([100.0 - 1e-6, 100.0 + 1e-6], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(lin_log_cut(x, 100.0, 1e3).sum(), x)
    torch.testing.assert_close(g, torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def fab_model(vacuum):
    import_methods()
    from openmm_flowforce.samplers import get_method

    method = get_method("fab")
    options = method.options({"n_layers": 2, "hidden": 32})
    return method, method.build(vacuum, options)


def test_internal_coordinates_come_from_the_force_field(vacuum, fab_model):
    """Bond scale sqrt(kT/k_b) and centre r0 of the System's harmonic bonds; sibling torsions narrow."""
    _, model = fab_model
    ic = model.generator.coordinates
    bond = next(f for f in vacuum.system.getForces() if isinstance(f, openmm.HarmonicBondForce))
    params = {}
    for n in range(bond.getNumBonds()):
        i, j, r0, k = bond.getBondParameters(n)
        params[frozenset((i, j))] = (r0.value_in_unit(unit.nanometer), k.value_in_unit(KJ / unit.nanometer ** 2))
    for p, (i, j) in enumerate(ic.rows[1:, :2].tolist()):
        r0, k = params[frozenset((i, j))]
        assert float(ic.bond_loc[p]) == pytest.approx(r0, rel=1e-12)
        assert float(ic.bond_scale[p]) == pytest.approx(math.sqrt(vacuum.kT / k), rel=1e-12)
    bonded = {frozenset((a.index, b.index)) for a, b in vacuum.topology.bonds()}
    for t, (_, j, _, l) in enumerate(ic.rows[3:].tolist()):
        assert bool(ic.torsion_periodic[t]) == (frozenset((j, l)) not in bonded)
    # phi and psi are circles, not intervals.
    from openmm_flowforce.analysis.molecule_sampler import backbone_dihedral_atoms

    atoms = backbone_dihedral_atoms(vacuum.topology)
    rows = ic.rows.tolist()
    for name in ("phi", "psi"):
        a = atoms[name]
        hits = [t for t, r in enumerate(rows[3:]) if {r[1], r[2]} == {a[1], a[2]} and bool(ic.torsion_periodic[t])]
        assert hits, f"no periodic torsion about the {name} bond"


def test_initial_flow_samples_are_sensible(vacuum, fab_model):
    """The untrained flow: finite log q consistent between sampling and density evaluation,
    rigid-motion invariant, finite (regularised) energies, and a real fraction of the samples
    below 100 kT. Overlapping atoms give OpenMM energies up to 10¹⁰ kT and more: those are
    what the lin-log cut (FAB's aldp target) keeps finite."""
    method, model = fab_model
    torch.manual_seed(0)
    with torch.no_grad():
        x, log_q = model.sample_and_log_prob(128)
        log_q_eval = method.log_prob(model, x)
        u = vacuum.energy(x)
    assert x.shape == (128, 66) and torch.isfinite(x).all()
    torch.testing.assert_close(log_q_eval, log_q, atol=1e-6, rtol=0)
    assert torch.isfinite(u).all() and float(u.max()) <= vacuum.energy_max
    assert float((u < 100.0).double().mean()) > 0.1
    # rotation + translation leave log q unchanged; project only moves the centre
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    moved = (x.reshape(128, 22, 3) @ q.T + torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)).reshape(128, -1)
    with torch.no_grad():
        torch.testing.assert_close(method.log_prob(model, moved), log_q, atol=1e-8, rtol=0)
        torch.testing.assert_close(method.log_prob(model, model.project(moved)), log_q, atol=1e-8, rtol=0)
    # the built-in structure: the chirality the flow carries (sibling torsions centred on it)
    x0 = torch.as_tensor(vacuum.positions).reshape(1, -1)
    with torch.no_grad():
        assert torch.isfinite(method.log_prob(model, x0)).all()
        mirror = x0.clone().reshape(1, 22, 3)
        mirror[..., 0] *= -1.0  # the D enantiomer
        assert float(method.log_prob(model, x0) - method.log_prob(model, mirror.reshape(1, -1))) > 100.0


def test_fab_cli_on_alanine_dipeptide_writes_a_model_the_evaluation_reads(tmp_path):
    import yaml

    from openmm_flowforce.cli.main import main
    from openmm_flowforce.potentials.boltzmann import load_boltzmann_generator
    from openmm_flowforce.samplers.molecule_flow import save_boltzmann_generator

    config = tmp_path / "fab.yaml"
    config.write_text(yaml.safe_dump({"options": {"batch_size": 16, "min_buffer": 16, "buffer_size": 64,
                                                  "n_layers": 2, "hidden": 32, "n_components": 4,
                                                  "n_intermediate": 1, "n_leapfrog": 3}}))
    ckpt = tmp_path / "fab.ckpt"
    argv = ["sampler", "train", "--target", "alanine-dipeptide", "--method", "fab", "--out", str(ckpt),
            "--config", str(config), "--quiet"]
    assert main([*argv, "--steps", "1"]) == 0
    assert main([*argv, "--steps", "2"]) == 0  # resumes (exact resume itself is the engine's, tested there)
    loaded = load_sampler(ckpt)
    summary = loaded.checkpoint["summary"]
    assert summary["steps"] == 2
    # 16 chains x (1 + 2 levels x 3 leapfrog) per AIS batch; buffer filled by 1 batch, then 1 per step
    assert summary["energy_evaluations"] == 3 * 16 * (1 + 2 * 3)
    assert loaded.options["flow"] == "internal"
    out = tmp_path / "x.npy"
    assert main(["sampler", "sample", str(ckpt), "-n", "8", "--out", str(out)]) == 0
    assert np.load(out).shape == (8, 66)
    reference = _perturbed(loaded.target, 40, sigma=0.002)
    from openmm_flowforce.data.dataset import save_dataset

    save_dataset(tmp_path / "ref.npz", topology=loaded.target.topology, positions=reference,
                 energies=np.zeros(len(reference)), temperature=300.0)
    report_path = tmp_path / "r.json"
    assert main(["sampler", "evaluate", str(ckpt), "--reference", str(tmp_path / "ref.npz"), "-n", "32",
                 "--out", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert 0.0 <= report["raw"]["js_phi_psi"] <= math.log(2) and 0.0 < report["ess"] <= 1.0
    assert report["energy_evaluations"] == summary["energy_evaluations"] and report["n_reference"] == 40
    # a flat .npy reference is refused with the fix (molecules want MD frames with their topology)
    np.save(tmp_path / "flat.npy", reference.reshape(40, -1))
    assert main(["sampler", "evaluate", str(ckpt), "--reference", str(tmp_path / "flat.npy"), "-n", "32",
                 "--out", str(tmp_path / "r2.json")]) == 2
    assert not (tmp_path / "r2.json").exists()
    # the same flow as a Boltzmann-generator model file (what `flowforce sample` reads)
    save_boltzmann_generator(loaded.model, tmp_path / "bg.ckpt", loaded.target.temperature, loaded.target.system)
    generator = load_boltzmann_generator(tmp_path / "bg.ckpt")
    x = torch.as_tensor(reference[:5])
    with torch.no_grad():
        torch.testing.assert_close(generator.log_prob(x), loaded.model.log_prob(x.reshape(5, -1)), atol=1e-10, rtol=0)


def test_flow_internal_refuses_a_toy_target():
    from openmm_flowforce.errors import FlowforceError
    from openmm_flowforce.samplers import get_method

    import_methods()
    method = get_method("fab")
    with pytest.raises(FlowforceError, match="molecule target"):
        method.build(make_target("dw4"), method.options({"flow": "internal"}))
