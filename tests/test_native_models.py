"""Real learned potentials through the native plugin (``backend="native"``): the CG net (default
run, float64 package compiled once per session) and the flow potential (``slow``: compiling it
takes minutes). Checks: energies and forces against the float64 eager model on Reference and CPU,
agreement with the TorchForce and PythonForce backends, finite differences through the Context,
NVE energy conservation no worse than through TorchForce, and the System XML round trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

openmm = pytest.importorskip("openmm")
from openmm import unit  # noqa: E402

from openmm_flowforce.export.backends import make_force  # noqa: E402
from openmm_flowforce.export.native import compiled_force_info  # noqa: E402
from potential_checks import FLOAT64_RTOL, assert_close, eager_cg, eager_flow, require_native_plugin  # noqa: E402

# The CPU platform adds every force into float32 buffers: relative 1e-5 of the largest force.
CPU_PLATFORM_RTOL = 1e-5


@pytest.fixture(autouse=True)
def _native_required():
    require_native_plugin()


def _system(masses, force) -> "openmm.System":
    system = openmm.System()
    for mass in masses:
        system.addParticle(float(mass))
    system.addForce(force)
    return system


def _context(system, platform="Reference", integrator=None):
    integrator = integrator or openmm.VerletIntegrator(0.001)
    return openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform))


def _state(context, positions):
    context.setPositions(positions)
    state = context.getState(getEnergy=True, getForces=True)
    return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))


def test_auto_prefers_the_native_plugin_for_packages(cg_package):
    force = make_force(cg_package)
    info = compiled_force_info(force)
    assert info is not None and info["dtype"] == "float64" and info["numModelParticles"] == 5
    assert force.getName() == "FlowForce"


@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_cg_net_through_native_matches_eager_and_the_other_backends(cg, cg_package, alanine_md, platform, tmp_path):
    from openmm_flowforce.export.torchscript import export_potential

    net, mapping, _ = cg
    native = _context(_system(mapping.masses, make_force(cg_package, backend="native")), platform)
    torchforce = _context(_system(mapping.masses, make_force(export_potential(cg, tmp_path / "cg.pt"),
                                                             backend="torchforce")), platform)
    rtol = FLOAT64_RTOL if platform == "Reference" else CPU_PLATFORM_RTOL
    for frame in (0, 700, 1499):
        beads = mapping.map_positions(alanine_md["positions"][frame])
        energy, forces = _state(native, beads)
        assert_close(energy, forces, *eager_cg(net, beads), rtol)
        assert_close(energy, forces, *_state(torchforce, beads), rtol)


def test_cg_native_forces_are_the_gradient_of_its_energy(cg_package, cg, alanine_md):
    _, mapping, _ = cg
    context = _context(_system(mapping.masses, make_force(cg_package, backend="native")))
    rng = np.random.default_rng(1)
    beads = mapping.map_positions(alanine_md["positions"][321])
    h = 1e-5  # nm: central differences, truncation ~h², rounding ~1e-16·|E|/h
    for _ in range(3):
        direction = rng.normal(size=beads.shape)
        direction /= np.linalg.norm(direction)
        _, forces = _state(context, beads)
        plus, _ = _state(context, beads + h * direction)
        minus, _ = _state(context, beads - h * direction)
        assert (plus - minus) / (2 * h) == pytest.approx(-float((forces * direction).sum()), rel=1e-6, abs=1e-6)


def _nve_energy_spread(system, positions, timestep_ps, steps, seed=5):
    """Standard deviation of the total energy (kJ/mol) over a velocity-Verlet run at 300 K."""
    context = _context(system, "Reference", openmm.VerletIntegrator(timestep_ps))
    context.setPositions(positions)
    context.setVelocitiesToTemperature(300 * unit.kelvin, seed)
    totals = []
    for _ in range(steps // 10):
        context.getIntegrator().step(10)
        state = context.getState(getEnergy=True)
        totals.append((state.getPotentialEnergy() + state.getKineticEnergy()).value_in_unit(unit.kilojoule_per_mole))
    totals = np.asarray(totals)
    assert np.all(np.isfinite(totals))
    return float(totals.std())


def test_cg_nve_at_5_fs_conserves_energy_as_well_as_torchforce(cg, cg_package, alanine_md, tmp_path):
    from openmm_flowforce.export.torchscript import export_potential

    _, mapping, _ = cg
    start = mapping.map_positions(alanine_md["positions"][800])
    kT = 2.494  # kJ/mol at 300 K
    native = _nve_energy_spread(_system(mapping.masses, make_force(cg_package, backend="native")), start, 0.005, 2000)
    scripted = _nve_energy_spread(_system(mapping.masses, make_force(export_potential(cg, tmp_path / "cg.pt"),
                                                                     backend="torchforce")), start, 0.005, 2000)
    # Same float64 model and integrator: the trajectories agree, so the spreads do too; and at
    # 5 fs the total energy of 5 beads (kinetic energy ~ 7.5 kT) stays within a kT.
    assert native == pytest.approx(scripted, rel=1e-3, abs=1e-6)
    assert native < kT


def test_system_with_the_native_force_round_trips_through_xml(cg, cg_package, alanine_md):
    from openmm_flowforce.errors import UnsafeFileError
    from openmm_flowforce.safety import deserialize_xml

    _, mapping, _ = cg
    system = _system(mapping.masses, make_force(cg_package, backend="native"))
    xml = openmm.XmlSerializer.serialize(system)
    assert "CompiledPotentialForce" in xml and len(xml) < 5000  # the package is referenced, not embedded
    # The package is native code: reading such XML needs the user's explicit trust.
    with pytest.raises(UnsafeFileError, match="compiled native code"):
        deserialize_xml(xml, source="system.xml")
    copy = deserialize_xml(xml, source="system.xml", trust=True)
    beads = mapping.map_positions(alanine_md["positions"][42])
    energy, forces = _state(_context(copy), beads)
    want_energy, want_forces = _state(_context(system), beads)
    assert energy == want_energy and np.array_equal(forces, want_forces)


@pytest.mark.slow
def test_flow_potential_through_native_matches_eager_and_conserves_energy(flow, alanine_md, tmp_path):
    from openmm_flowforce.export.compiled import compile_package
    from openmm_flowforce.export.torchscript import export_potential

    package = compile_package(flow, tmp_path / "flow64.pt2", temperature=300.0, dtype=torch.float64)
    masses = [atom.element.mass.value_in_unit(unit.dalton) for atom in alanine_md["topology"].atoms()]
    system = _system(masses, make_force(package, backend="native"))
    context = _context(system)
    for frame in (5, 900):
        x = alanine_md["positions"][frame]
        assert_close(*_state(context, x), *eager_flow(flow, x), FLOAT64_RTOL)
    # The fixture's flow has random (untrained) layers, so its surface is rough and the absolute
    # spread says little; what the backend owes is conservation no worse than TorchForce's.
    scripted = _system(masses, make_force(export_potential(flow, tmp_path / "flow.pt", temperature=300.0),
                                          backend="torchforce"))
    start = alanine_md["positions"][900]
    native_spread = _nve_energy_spread(system, start, 0.0005, 1000)
    scripted_spread = _nve_energy_spread(scripted, start, 0.0005, 1000)
    assert native_spread <= 1.05 * scripted_spread + 1e-6, (native_spread, scripted_spread)
