"""Units at the API and the ``app.Simulation`` builder: Quantities everywhere a temperature,
time step, friction or positions is taken; a learned potential one call away from an
``openmm.app.Simulation`` whose saveState/loadState/saveCheckpoint work."""
from __future__ import annotations

import numpy as np
import pytest
import torch

openmm = pytest.importorskip("openmm")
from openmm import app, unit  # noqa: E402

from openmm_flowforce.conventions import in_openmm_units, kT  # noqa: E402
from openmm_flowforce.data import alanine_dipeptide_pdb  # noqa: E402
from openmm_flowforce.errors import OptionError  # noqa: E402
from openmm_flowforce.export.torchscript import export_potential, read_export_metadata  # noqa: E402
from openmm_flowforce.md.simulation import create_simulation  # noqa: E402
from openmm_flowforce.openmm import make_force  # noqa: E402
from openmm_flowforce.potentials import BoltzmannGenerator  # noqa: E402


@pytest.fixture(scope="module")
def exported(alanine_md, tmp_path_factory):
    """``(model, .pt exported at 310 K)``: a tiny flow (2 layers of width 8)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = BoltzmannGenerator.from_topology(alanine_md["topology"], alanine_md["positions"][:600], n_layers=2,
                                                 hidden=8, n_components=2).eval()
        path = export_potential(model, tmp_path_factory.mktemp("app") / "ala.pt", temperature=310 * unit.kelvin)
    finally:
        torch.set_default_dtype(old)
    return model, path


def test_quantities_convert_to_openmm_units_and_wrong_dimensions_are_refused():
    assert in_openmm_units(2 * unit.femtosecond, "time", "timestep") == pytest.approx(0.002)
    assert in_openmm_units(2 * unit.femtosecond, "time", "timestep_fs", 1e3) == pytest.approx(2.0)
    assert in_openmm_units(0.5 / unit.femtosecond, "friction", "friction") == pytest.approx(500.0)
    assert in_openmm_units(3.0, "time", "timestep") == 3.0  # numbers are in OpenMM's units already
    positions = in_openmm_units([openmm.Vec3(1, 2, 3)] * unit.angstrom, "length", "positions")
    np.testing.assert_allclose(positions, [[0.1, 0.2, 0.3]])
    assert kT(300 * unit.kelvin) == pytest.approx(kT(300.0))
    with pytest.raises(OptionError, match="temperature must be a temperature.*1 ps"):
        kT(1 * unit.picosecond)
    with pytest.raises(OptionError, match="timestep must be a time"):
        in_openmm_units(1 * unit.nanometer, "time", "timestep")


def test_exported_and_forced_temperatures_accept_quantities(exported):
    _, path = exported
    assert read_export_metadata(path)["temperature"] == pytest.approx(310.0)
    assert make_force(path, temperature=310 * unit.kelvin).getName() == "FlowForce"
    with pytest.raises(OptionError, match="temperature must be a temperature"):
        make_force(path, temperature=310 * unit.nanometer)
    from openmm_flowforce.openmm import create_system

    topology = app.PDBFile(alanine_dipeptide_pdb()).topology
    assert create_system(topology, path, temperature=310 * unit.kelvin).getNumParticles() == 22
    with pytest.raises(ValueError, match="exported at 310 K"):
        create_system(topology, path, temperature=(300 * unit.kelvin))


def test_create_simulation_takes_quantities_or_floats(exported, alanine_md):
    _, path = exported
    x = alanine_md["positions"][0]
    with_units = create_simulation(alanine_md["topology"], path, x * unit.nanometer, timestep=2 * unit.femtosecond,
                                   friction=0.5 / unit.picosecond, platform="Reference", seed=3)
    with_floats = create_simulation(alanine_md["topology"], path, x, timestep=0.002, friction=0.5,
                                    platform="Reference", seed=3)
    for simulation in (with_units, with_floats):
        integrator = simulation.integrator
        assert integrator.getStepSize().value_in_unit(unit.picosecond) == pytest.approx(0.002)
        assert integrator.getFriction().value_in_unit(unit.picosecond ** -1) == pytest.approx(0.5)
        assert integrator.getTemperature().value_in_unit(unit.kelvin) == pytest.approx(310.0)
        simulation.context.setVelocitiesToTemperature(310 * unit.kelvin, 1)
        simulation.step(3)
        assert np.isfinite(simulation.context.getState(getEnergy=True).getPotentialEnergy()._value)
    with pytest.raises(OptionError, match="timestep must be a time"):
        create_simulation(alanine_md["topology"], path, x, timestep=2 * unit.kelvin)
    with pytest.raises(OptionError, match="positions have shape"):
        create_simulation(alanine_md["topology"], path, x[:5], platform="Reference")


def test_save_and_load_state_and_checkpoint(exported, alanine_md, tmp_path):
    """OpenMM's own Simulation methods: resuming from a checkpoint or a State reproduces the run
    (Reference platform, fixed seed: bitwise)."""
    _, path = exported
    simulation = create_simulation(alanine_md["topology"], path, alanine_md["positions"][0], platform="Reference",
                                   seed=5)
    simulation.context.setVelocitiesToTemperature(310 * unit.kelvin, 1)
    simulation.step(5)
    simulation.saveCheckpoint(str(tmp_path / "run.chk"))
    simulation.saveState(str(tmp_path / "run.xml"))
    simulation.step(5)
    after = simulation.context.getState(getPositions=True).getPositions(asNumpy=True)._value
    simulation.loadCheckpoint(str(tmp_path / "run.chk"))
    simulation.step(5)
    again = simulation.context.getState(getPositions=True).getPositions(asNumpy=True)._value
    np.testing.assert_array_equal(after, again)

    fresh = create_simulation(alanine_md["topology"], path, platform="Reference", seed=5)
    fresh.loadState(str(tmp_path / "run.xml"))
    state = fresh.context.getState(getPositions=True, getEnergy=True)
    assert state.getStepCount() == 5
    assert np.isfinite(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    fresh.step(2)  # a loaded State runs


def test_create_simulation_from_a_pdb_path_uses_its_positions(exported, tmp_path, alanine_md):
    _, path = exported
    pdb = tmp_path / "ala.pdb"
    with open(pdb, "w") as handle:
        app.PDBFile.writeFile(alanine_md["topology"], alanine_md["positions"][10] * unit.nanometer, handle)
    simulation = create_simulation(str(pdb), path, platform="Reference")
    x = simulation.context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    np.testing.assert_allclose(x, alanine_md["positions"][10], atol=1e-4)  # PDB precision: 0.001 Å


def test_exported_potential_takes_positions_as_quantities(exported, alanine_md):
    from openmm_flowforce.export.torchscript import load_exported

    potential = load_exported(exported[1])
    x = alanine_md["positions"][7]
    in_nm = potential.energy(x)
    assert potential.energy(x * 10 * unit.angstrom) == pytest.approx(in_nm, rel=1e-12)
    assert potential.energy([openmm.Vec3(*row) for row in x] * unit.nanometer) == pytest.approx(in_nm, rel=1e-12)
    with pytest.raises(OptionError, match="positions must be a length"):
        potential.energy(x * unit.kelvin)
