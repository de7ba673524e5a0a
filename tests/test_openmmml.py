"""openmm-ml entry point and mixed Systems: ``MLPotential("flowforce", modelFile=...)``.

The test System is two alanine dipeptides 1.2 nm apart (amber14, no cutoff, no
constraints); the learned potential (a tiny flow, 2 layers of width 8) acts on the
*second* copy, so its System indices are 22..43, not the first N. Term by term, with the
learned force in force group 1:

* group 1 = the eager model on the second copy's positions (energy and forces, zero force
  on the first copy);
* group 0 = E_MM(both) − E_MM(second copy alone): openmm-ml's mechanical embedding removes
  every MM interaction inside the ML subset and keeps the rest; with no cutoff the
  intramolecular Amber energy of the copy alone is exactly what was removed.

Tolerances: float64 everywhere on the Reference platform; the learned force agrees to 1e-9
relative (TorchScript reassociation), the MM difference to 1e-6 kJ/mol-scale rounding of
sums of ~10³ kJ/mol terms.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

openmm = pytest.importorskip("openmm")
openmmml = pytest.importorskip("openmmml")
from openmm import app, unit  # noqa: E402
from openmmml import MLPotential  # noqa: E402

from openmm_flowforce.errors import FlowforceError  # noqa: E402
from openmm_flowforce.export.backends import LEARNED_FORCE_NAME  # noqa: E402
from openmm_flowforce.export.torchscript import export_potential  # noqa: E402
from openmm_flowforce.potentials import BoltzmannGenerator  # noqa: E402

KJ, NM = unit.kilojoule_per_mole, unit.nanometer
SHIFT_NM = np.array([1.2, 0.0, 0.0])
ML_ATOMS = list(range(22, 44))


@pytest.fixture(scope="module")
def flow_file(alanine_md, tmp_path_factory):
    """``(model, exported .pt)``: a tiny non-identity flow on alanine dipeptide at 300 K."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = BoltzmannGenerator.from_topology(alanine_md["topology"], alanine_md["positions"][:600], n_layers=2,
                                                 hidden=8, n_components=2, identity_init=False).eval()
        path = export_potential(model, tmp_path_factory.mktemp("openmmml") / "ala.pt", temperature=300.0)
    finally:
        torch.set_default_dtype(old)
    return model, path


@pytest.fixture(scope="module")
def two_copies(alanine_md):
    """``(topology, positions (44, 3) nm, mm_system, single_system)``: two dipeptides, Amber."""
    single = alanine_md["topology"]
    x = alanine_md["positions"][100]
    modeller = app.Modeller(single, x * NM)
    modeller.add(single, (x + SHIFT_NM) * NM)
    forcefield = app.ForceField("amber14-all.xml")
    mm = forcefield.createSystem(modeller.topology, nonbondedMethod=app.NoCutoff, constraints=None)
    alone = forcefield.createSystem(single, nonbondedMethod=app.NoCutoff, constraints=None)
    # A different conformation for the ML copy, so the two copies are not images of each other.
    positions = np.concatenate([x, alanine_md["positions"][700] + SHIFT_NM])
    return modeller.topology, positions, mm, alone


def _eager(model, positions):
    x = torch.as_tensor(positions, dtype=torch.float64)[None].requires_grad_(True)
    energy = model.to(torch.float64).energy(x, 300.0)
    (grad,) = torch.autograd.grad(energy.sum(), x)
    return float(energy.detach()), -grad[0].numpy()


def _energy_forces(system, positions, groups=-1, parameters=None):
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions * NM)
    for name, value in (parameters or {}).items():
        context.setParameter(name, value)
    state = context.getState(getEnergy=True, getForces=True, groups=groups)
    return state.getPotentialEnergy().value_in_unit(KJ), state.getForces(asNumpy=True).value_in_unit(KJ / NM)


def _check_mixed(mixed, model, two_copies):
    topology, positions, mm, alone = two_copies
    energy_ml, forces_ml = _energy_forces(mixed, positions, groups={1})
    expected_energy, expected_forces = _eager(model, positions[22:])
    assert energy_ml == pytest.approx(expected_energy, rel=1e-9)
    scale = np.abs(expected_forces).max()
    np.testing.assert_allclose(forces_ml[22:], expected_forces, rtol=0, atol=1e-9 * scale)
    assert np.all(forces_ml[:22] == 0)

    energy_mm, forces_mm = _energy_forces(mixed, positions, groups={0})
    energy_all, forces_all = _energy_forces(mm, positions)
    energy_alone, forces_alone = _energy_forces(alone, positions[22:])
    assert energy_mm == pytest.approx(energy_all - energy_alone, abs=1e-6)
    reference = forces_all.copy()
    reference[22:] -= forces_alone
    np.testing.assert_allclose(forces_mm, reference, rtol=0, atol=1e-6)

    total, _ = _energy_forces(mixed, positions)
    assert total == pytest.approx(energy_mm + energy_ml, abs=1e-6)


def test_entry_point_is_registered():
    assert "flowforce" in MLPotential._implFactories


@pytest.mark.parametrize("backend", ["torchforce", "pythonforce"])
def test_create_system_is_the_learned_potential_alone(flow_file, alanine_md, backend):
    model, path = flow_file
    system = MLPotential("flowforce", modelFile=str(path), backend=backend).createSystem(alanine_md["topology"])
    assert sorted(f.getName() for f in system.getForces()) == ["CMMotionRemover", LEARNED_FORCE_NAME]
    x = alanine_md["positions"][300]
    energy, forces = _energy_forces(system, x)
    expected_energy, expected_forces = _eager(model, x)
    assert energy == pytest.approx(expected_energy, rel=1e-9)
    np.testing.assert_allclose(forces, expected_forces, rtol=0, atol=1e-9 * np.abs(expected_forces).max())
    masses = [system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(system.getNumParticles())]
    assert masses == pytest.approx([a.element.mass.value_in_unit(unit.dalton) for a in alanine_md["topology"].atoms()])


@pytest.mark.parametrize("backend", ["torchforce", "pythonforce"])
def test_mixed_system_is_mm_plus_learned_term_by_term(flow_file, two_copies, backend):
    model, path = flow_file
    topology, _, mm, _ = two_copies
    mixed = MLPotential("flowforce", modelFile=str(path), backend=backend).createMixedSystem(
        topology, mm, ML_ATOMS, forceGroup=1)
    _check_mixed(mixed, model, two_copies)


def test_mixed_system_interpolates_between_mm_and_mixed(flow_file, two_copies):
    """lambda_interpolate = 0: the MM System's energy; 1: the mixed System's; linear between.
    openmm-ml copies the ML force for this, so ``auto`` must avoid TorchForce (copying crashes)."""
    model, path = flow_file
    topology, positions, mm, _ = two_copies
    potential = MLPotential("flowforce", modelFile=str(path))
    interpolating = potential.createMixedSystem(topology, mm, ML_ATOMS, interpolate=True)
    mixed = potential.createMixedSystem(topology, mm, ML_ATOMS)
    energy_mm, _ = _energy_forces(mm, positions)
    energy_mixed, _ = _energy_forces(mixed, positions)
    energies = [_energy_forces(interpolating, positions, parameters={"lambda_interpolate": lam})[0]
                for lam in (0.0, 0.25, 1.0)]
    # openmm-ml rebuilds the MM terms inside a CustomCVForce: the same sums in another order
    # (measured 1.8e-6 kJ/mol apart here, of terms ~10^3 kJ/mol).
    assert energies[0] == pytest.approx(energy_mm, abs=1e-5)
    assert energies[2] == pytest.approx(energy_mixed, abs=1e-5)
    assert energies[1] == pytest.approx(0.75 * energy_mm + 0.25 * energy_mixed, abs=1e-5)
    with pytest.raises(FlowforceError, match="interpolate=True"):
        MLPotential("flowforce", modelFile=str(path), backend="torchforce").createMixedSystem(
            topology, mm, ML_ATOMS, interpolate=True)


def test_mistakes_are_one_line_errors(flow_file, two_copies):
    _, path = flow_file
    topology, _, mm, _ = two_copies
    with pytest.raises(FlowforceError, match="modelFile"):
        MLPotential("flowforce")
    with pytest.raises(FlowforceError, match="unknown arguments.*modelfile"):
        MLPotential("flowforce", modelfile=str(path))
    with pytest.raises(FlowforceError, match="unknown force backend"):
        MLPotential("flowforce", modelFile=str(path), backend="fast")
    potential = MLPotential("flowforce", modelFile=str(path))
    with pytest.raises(FlowforceError, match="44 atoms but the model describes 22"):
        potential.createMixedSystem(topology, mm, range(44))
    with pytest.raises(FlowforceError, match="cut 1 bond"):
        potential.createMixedSystem(topology, mm, ML_ATOMS[:-1])  # openmm-ml would add a link atom
    with pytest.raises(FlowforceError, match="the model's order"):
        potential.createMixedSystem(topology, mm, ML_ATOMS[::-1])
    with pytest.raises(FlowforceError, match="model describes 22"):
        potential.createSystem(topology)  # 44 atoms


def test_a_broken_flowforce_never_breaks_import_openmmml(tmp_path):
    """With torch unimportable, ``import openmmml`` still works; only creating the potential fails."""
    script = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        from openmmml import MLPotential
        assert "flowforce" in MLPotential._implFactories
        try:
            MLPotential("flowforce", modelFile="ala.pt")
        except ImportError as error:
            print("creation failed:", isinstance(error, ImportError))
        """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "creation failed: True" in result.stdout


@pytest.mark.slow
def test_native_mixed_system_term_by_term(flow_file, two_copies, tmp_path):
    """The C++ plugin's force on System indices 22..43 (compiling the float64 package: ~1-2 min)."""
    from openmm_flowforce.export.compiled import compile_package
    from openmm_flowforce.export.native import native_unavailable

    if native_unavailable() is not None:
        pytest.skip(f"native plugin: {native_unavailable()}")
    model, _ = flow_file
    package = compile_package(model, tmp_path / "ala.pt2", dtype=torch.float64)
    topology, _, mm, _ = two_copies
    mixed = MLPotential("flowforce", modelFile=str(package), backend="native").createMixedSystem(
        topology, mm, ML_ATOMS, forceGroup=1)
    _check_mixed(mixed, model, two_copies)
    # save_system records the plugin force's particles; load_system restores them.
    from openmm_flowforce.openmm import load_system, save_system

    save_system(mixed, tmp_path / "mixed.xml")
    _check_mixed(load_system(tmp_path / "mixed.xml", package, backend="native"), model, two_copies)


def test_cg_model_gets_its_bead_masses(alanine_md, tmp_path):
    """A CG export stores bead masses; openmm-ml's createSystem gives element masses (or 0
    for element-less atoms), which the adapter replaces. Energies equal create_system's."""
    from openmm_flowforce.coordinates.cg_mapping import CGMapping
    from openmm_flowforce.export.cg import export_cg_potential
    from openmm_flowforce.export.torchscript import read_export_metadata, read_pdb_text
    from openmm_flowforce.openmm import create_system
    from openmm_flowforce.potentials.cg_net import CGEnergyNet

    mapping = CGMapping.from_topology(alanine_md["topology"], "backbone")
    beads = mapping.map_positions(alanine_md["positions"])
    torch.manual_seed(0)
    net = CGEnergyNet.from_data(mapping, beads[:600], 300.0, hidden=(8, 8), priors={"bonds": {}, "angles": {}})
    path = export_cg_potential((net.double().eval(), mapping, mapping.pdb_text(beads[0])), tmp_path / "cg.pt")
    topology, _ = read_pdb_text(mapping.pdb_text(beads[0]))
    reference = create_system(topology, str(path))
    stored = read_export_metadata(path)["masses"]
    # The same beads without elements, as a CG topology from elsewhere may have them.
    bare = app.Topology()
    residue = bare.addResidue("CG", bare.addChain())
    for atom in topology.atoms():
        bare.addAtom(atom.name, None, residue)
    for top in (topology, bare):
        system = MLPotential("flowforce", modelFile=str(path)).createSystem(top, removeCMMotion=False)
        masses = [system.getParticleMass(i)._value for i in range(system.getNumParticles())]
        assert masses == pytest.approx(stored, rel=1e-15) and min(masses) > 0
    energy, forces = _energy_forces(system, beads[5])
    expected_energy, expected_forces = _energy_forces(reference, beads[5])
    assert energy == pytest.approx(expected_energy, rel=1e-12)
    np.testing.assert_allclose(forces, expected_forces, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torchforce", "pythonforce"])
def test_make_force_on_particles_in_any_order(flow_file, alanine_md, backend):
    """``make_force(particles=...)``: the model's atom k is System particle particles[k]; the
    other particles feel nothing. Here a 30-particle System holds the molecule backwards."""
    from openmm_flowforce.openmm import make_force

    model, path = flow_file
    particles = list(range(29, 7, -1))
    system = openmm.System()
    for _ in range(30):
        system.addParticle(1.0)
    system.addForce(make_force(path, backend=backend, particles=particles))
    positions = np.random.default_rng(1).normal(size=(30, 3))
    positions[particles] = alanine_md["positions"][42]
    energy, forces = _energy_forces(system, positions)
    expected_energy, expected_forces = _eager(model, alanine_md["positions"][42])
    assert energy == pytest.approx(expected_energy, rel=1e-9)
    np.testing.assert_allclose(forces[particles], expected_forces, rtol=0, atol=1e-9 * np.abs(expected_forces).max())
    assert np.all(forces[:8] == 0)
    with pytest.raises(FlowforceError, match="particles has 21 indices but the model has 22"):
        make_force(path, backend=backend, particles=particles[1:])
    with pytest.raises(FlowforceError, match=r"repeats the System indices \[29\]"):
        make_force(path, backend=backend, particles=[29] + particles[:-1])


@pytest.mark.parametrize("backend", ["torchforce", "pythonforce"])
def test_save_and_load_a_mixed_system(flow_file, two_copies, tmp_path, backend):
    """save_system records which particles the learned force acts on; load_system restores it."""
    from openmm_flowforce.openmm import load_system, save_system

    model, path = flow_file
    topology, positions, mm, _ = two_copies
    mixed = MLPotential("flowforce", modelFile=str(path), backend=backend).createMixedSystem(
        topology, mm, ML_ATOMS, forceGroup=1)
    save_system(mixed, tmp_path / "mixed.xml")
    loaded = load_system(tmp_path / "mixed.xml", path, backend=backend)
    for groups in ({0}, {1}):
        energy, forces = _energy_forces(loaded, positions, groups=groups)
        expected_energy, expected_forces = _energy_forces(mixed, positions, groups=groups)
        assert energy == pytest.approx(expected_energy, rel=1e-12, abs=1e-9)
        np.testing.assert_allclose(forces, expected_forces, rtol=1e-12, atol=1e-9)
