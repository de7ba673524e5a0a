"""A ready ``openmm.app.Simulation`` for a learned potential: :func:`create_simulation`.

Users attach their own reporters and call ``simulation.step``, ``saveState``,
``loadState``, ``saveCheckpoint`` as with any OpenMM Simulation; ``flowforce simulate``
(:func:`openmm_flowforce.md.simulate.simulate`) is built on it. Units: every physical
argument is a number in OpenMM's units (K, ps, 1/ps, nm) or an ``openmm.unit`` Quantity
(:func:`openmm_flowforce.conventions.in_openmm_units`).
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from ..conventions import in_openmm_units
from ..errors import FlowforceError, OptionError

__all__ = ["DEFAULT_FRICTION", "DEFAULT_TIMESTEP", "PLATFORMS", "create_simulation", "platform_by_name"]

#: Accepted ``platform`` values; ``auto`` lets OpenMM pick the fastest one available.
PLATFORMS = ("auto", "CUDA", "OpenCL", "CPU", "Reference")
#: ps (1 fs).
DEFAULT_TIMESTEP = 0.001
#: 1/ps.
DEFAULT_FRICTION = 1.0


def platform_by_name(name: str) -> Any:
    """The OpenMM platform called ``name``, or None for ``auto``.

    Raises:
        FlowforceError: unknown or unavailable platform (the message lists the available ones).
    """
    import openmm

    if name not in PLATFORMS:
        raise OptionError(f"unknown platform {name!r}; valid: {', '.join(PLATFORMS)}")
    if name == "auto":
        return None
    available = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
    if name not in available:
        raise FlowforceError(f"OpenMM platform {name!r} is not available here; available: {', '.join(available)} "
                             "(or use auto; `flowforce doctor` explains missing ones)")
    return openmm.Platform.getPlatformByName(name)


def read_molecule_pdb(path: Any) -> Any:
    """``app.PDBFile`` of the molecule a learned potential acts on, with one clear error for a
    missing, foreign or empty file."""
    from openmm import app

    from ..errors import BadFileError
    from ..io import bad_file, require_input_file

    what = "a PDB file of the molecule (atoms in the model's order)"
    checked = require_input_file(path, what)
    try:
        pdb = app.PDBFile(str(checked))
    except Exception as error:  # OpenMM's PDB reader raises several types for foreign files
        raise bad_file(checked, what, error, "pass the PDB the model was trained on") from None
    if pdb.topology.getNumAtoms() == 0:
        raise BadFileError(f"{checked} has no atoms; expected {what}")
    return pdb


def _positive(value: float, name: str, unit_name: str, zero_ok: bool = False) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise OptionError(f"{name} must be a {'non-negative' if zero_ok else 'positive'} number of {unit_name} "
                          f"(or an openmm.unit Quantity), got {value!r}")
    return value


def create_simulation(topology: Any, model: Any, positions: Any = None, *, temperature: Any = None,
                      timestep: Any = DEFAULT_TIMESTEP, friction: Any = DEFAULT_FRICTION, platform: str = "auto",
                      backend: str = "auto", seed: int | None = None, platform_properties: dict | None = None,
                      integrator: Any = None) -> Any:
    """An ``openmm.app.Simulation`` of the molecule under its learned potential, Langevin dynamics.

    Args:
        topology: ``openmm.app.Topology`` (atoms in the model's order), or the path of a PDB
            file, whose positions are then used when ``positions`` is None.
        model: exported ``.pt``, compiled ``.pt2``, checkpoint path, or ``BoltzmannGenerator``.
        positions: ``(N, 3)`` nm (array) or a Quantity; set on the context when given.
        temperature: K or Quantity; default: the exported file's, or 300 K for a checkpoint.
        timestep: ps or Quantity (default 1 fs).
        friction: 1/ps or Quantity (default 1/ps).
        platform: ``auto`` (OpenMM's fastest), ``CUDA``, ``OpenCL``, ``CPU`` or ``Reference``.
        backend: force backend (``auto``, ``torchforce``, ``pythonforce``, ``native``).
        seed: Langevin noise seed (OpenMM treats 0 as "random": ``seed + 1`` is passed);
            None: OpenMM's random seed.
        platform_properties: passed to ``app.Simulation``.
        integrator: an ``openmm.Integrator`` to use instead of Langevin dynamics (e.g.
            :class:`~openmm_flowforce.md.esh.ESHIntegrator`); ``timestep`` and ``friction``
            are then ignored and ``seed`` seeds its random numbers.

    Returns:
        ``app.Simulation`` with a ``LangevinMiddleIntegrator`` (or ``integrator``); velocities are not set.

    Raises:
        OptionError: a bad value or a Quantity of the wrong dimension.
        FlowforceError: a topology that does not match the model, an unavailable platform.
    """
    import openmm
    from openmm import app, unit

    from ..export.backends import resolve_potential
    from ..export.system import create_system

    timestep = _positive(in_openmm_units(timestep, "time", "timestep"), "timestep", "ps")
    friction = _positive(in_openmm_units(friction, "friction", "friction"), "friction", "1/ps", zero_ok=True)
    if seed is not None and not 0 <= int(seed) < 2**31 - 1:
        raise OptionError(f"seed must be in [0, 2^31 − 2], got {seed}")
    platform_obj = platform_by_name(platform)
    if isinstance(topology, (str, os.PathLike)):
        pdb = read_molecule_pdb(topology)
        topology = pdb.topology
        positions = pdb.positions if positions is None else positions
    source = resolve_potential(model, temperature)
    system = create_system(topology, source, backend=backend)
    if integrator is None:
        integrator = openmm.LangevinMiddleIntegrator(source.temperature * unit.kelvin, friction / unit.picosecond,
                                                     timestep * unit.picosecond)
    if seed is not None:
        integrator.setRandomNumberSeed(int(seed) + 1)
    args: tuple = (topology, system, integrator)
    if platform_obj is not None:
        args += (platform_obj,) + ((platform_properties,) if platform_properties else ())
    simulation = app.Simulation(*args)
    if positions is not None:
        x = np.asarray(in_openmm_units(positions, "length", "positions"), dtype=np.float64)
        if x.shape != (system.getNumParticles(), 3):
            raise OptionError(f"positions have shape {x.shape}; the System has {system.getNumParticles()} particles "
                              "(expected (N, 3) nm)")
        simulation.context.setPositions(x * unit.nanometer)
    return simulation
