"""The native plugin (``CompiledPotentialForce``, C++): exact values on an analytic toy package in
real OpenMM Contexts, the C++ test program, XML round trips and refusals.

The toy package is E = Σ|r|² (kJ/mol), F = −2r (kJ/mol/nm), compiled once per session (tens of
seconds: Inductor runs the C++ compiler). Real models through the plugin are tested with the
compiled export (tests/test_compiled_export.py)."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from openmm_flowforce.export.native import (NATIVE_DIR, compiled_force_info, compiled_potential_force, file_sha256,
                                            write_toy_package)
from potential_checks import require_native_plugin

N_MODEL = 4


@pytest.fixture(scope="session")
def toy_package(tmp_path_factory):
    require_native_plugin()
    return write_toy_package(tmp_path_factory.mktemp("native") / "toy.pt2", N_MODEL, dtype="float64")


def _system(n_particles: int, force):
    import openmm

    system = openmm.System()
    for _ in range(n_particles):
        system.addParticle(1.0)
    system.addForce(force)
    return system


def _evaluate(system, positions, platform="Reference"):
    import openmm

    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform))
    context.setPositions(positions)
    state = context.getState(getEnergy=True, getForces=True)
    return state.getPotentialEnergy()._value, state.getForces(asNumpy=True)._value


@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_toy_package_exact_on_a_particle_subset(toy_package, platform):
    particles = [5, 0, 3, 1]
    system = _system(7, compiled_potential_force(toy_package, N_MODEL, "float64", particles=particles))
    positions = np.random.default_rng(3).uniform(-1.0, 1.0, size=(7, 3))
    energy, forces = _evaluate(system, positions, platform)
    tolerance = 1e-12 if platform == "Reference" else 1e-5  # CPU accumulates forces in float32
    assert energy == pytest.approx(float((positions[particles] ** 2).sum()), abs=1e-10)
    np.testing.assert_allclose(forces[particles], -2.0 * positions[particles], atol=tolerance, rtol=tolerance)
    np.testing.assert_array_equal(forces[[2, 4, 6]], 0.0)  # particles the model does not cover


def test_system_xml_round_trip_names_the_package_and_holds_no_code(toy_package):
    import openmm

    system = _system(N_MODEL, compiled_potential_force(toy_package, N_MODEL, "float64"))
    xml = openmm.XmlSerializer.serialize(system)
    assert f'sha256="{file_sha256(toy_package)}"' in xml and str(toy_package) in xml
    assert "pickle" not in xml.lower() and len(xml) < 4000  # a reference, not the program's bytes
    copy = openmm.XmlSerializer.deserialize(xml)
    positions = np.random.default_rng(4).normal(size=(N_MODEL, 3))
    assert _evaluate(copy, positions)[0] == pytest.approx(_evaluate(system, positions)[0], abs=1e-12)
    assert compiled_force_info(copy.getForce(0))["numModelParticles"] == N_MODEL


def test_a_changed_package_is_refused(toy_package, tmp_path):
    import openmm

    package = tmp_path / "copy.pt2"
    shutil.copyfile(toy_package, package)
    system = _system(N_MODEL, compiled_potential_force(package, N_MODEL, "float64"))
    xml = openmm.XmlSerializer.serialize(system)
    with open(package, "ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(openmm.OpenMMException, match="has changed since this force was created"):
        _evaluate(system, np.zeros((N_MODEL, 3)))
    with pytest.raises(openmm.OpenMMException, match="does not match the SHA-256"):
        openmm.XmlSerializer.deserialize(xml)


def test_bad_arguments_are_refused_with_the_reason(toy_package, tmp_path):
    import openmm

    with pytest.raises(FileNotFoundError, match="does not exist"):
        compiled_potential_force(tmp_path / "missing.pt2", N_MODEL)
    with pytest.raises(ValueError, match="covers 4 particles, got 2 particle indices"):
        compiled_potential_force(toy_package, N_MODEL, "float64", particles=[0, 1])
    with pytest.raises(ValueError, match="listed twice"):
        compiled_potential_force(toy_package, N_MODEL, "float64", particles=[0, 1, 1, 2])
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        compiled_potential_force(toy_package, N_MODEL, "float16")
    system = _system(2, compiled_potential_force(toy_package, N_MODEL, "float64"))
    with pytest.raises(openmm.OpenMMException, match="covers 4 particles but the System has 2"):
        _evaluate(system, np.zeros((2, 3)))


def test_cpp_test_program(toy_package):
    import os

    import openmm.version
    import torch

    program = NATIVE_DIR / "TestCompiledPotentialForce"
    assert program.is_file(), "setup.py installs the C++ test next to the library"
    # The libraries of this Python's torch and openmm wheels (an editable install's program is
    # not inside site-packages, so its relative RPATH does not reach them).
    folders = [str(NATIVE_DIR), os.path.join(os.path.dirname(torch.__file__), "lib"), openmm.version.openmm_library_path]
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join([*folders, os.environ.get("LD_LIBRARY_PATH", "")])}
    result = subprocess.run([str(program), str(toy_package)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout
