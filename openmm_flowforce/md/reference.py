"""Reference molecular dynamics: the trajectories, forces and energies flows are trained on.

:func:`run_reference_md` runs Langevin dynamics (``LangevinMiddleIntegrator``: Zhang, Liu,
Wang, Lu, J. Phys. Chem. A 2019, 123, 6056) in three stages:

1. local energy minimisation (OpenMM's L-BFGS, default tolerance), so the start is not a
   clash that heats the molecule;
2. equilibration: ``equilibration_ps`` (default 10 ps, ~10 velocity relaxation times at the
   default friction of 1/ps) of unrecorded dynamics from Maxwell–Boltzmann velocities;
3. production: one frame (positions, forces, potential energy) every ``save_every_ps``.

Runs are reproducible: the integrator's and the initial velocities' random seeds are both
derived from ``seed`` (OpenMM treats a seed of 0 as "pick one at random", so the user's
seed is never passed through as is). On the Reference platform the same seed gives
bit-identical trajectories; on CPU/CUDA the order of floating-point sums can differ
between runs with a different number of threads.

A ``KeyboardInterrupt`` (Ctrl-C) during production stops the run and returns the frames
collected so far with ``interrupted=True``; the caller saves them.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..conventions import in_openmm_units
from ..errors import FlowforceError

__all__ = ["PLATFORM_ORDER", "SMALL_SYSTEM_ATOMS", "choose_platform", "derive_seeds", "minimize_energy",
           "platform_properties", "run_reference_md"]

#: Platforms in the order ``platform="auto"`` tries them (fastest first for real systems).
PLATFORM_ORDER: tuple[str, ...] = ("CUDA", "OpenCL", "CPU", "Reference")

#: Systems with at most this many atoms and no generalized Born force run fastest on the
#: Reference platform, which has no per-step thread or kernel-launch overhead. Measured
#: with amber14 vacuum copies of alanine dipeptide on 2 cores (steps/s, Reference vs CPU):
#: 22 atoms 122k vs 13k, 110 atoms 11k vs 7.8k, 220 atoms 3.2k vs 4.9k. With OBC2 implicit
#: solvent the CPU platform wins already at 22 atoms (5.6k vs 0.9k steps/s).
SMALL_SYSTEM_ATOMS = 150


def derive_seeds(seed: int) -> tuple[int, int]:
    """Two nonzero 31-bit seeds (integrator, velocities) determined by ``seed``."""
    states = np.random.SeedSequence(int(seed)).generate_state(2, dtype=np.uint32)
    return tuple(int(s) % (2**31 - 2) + 1 for s in states)  # type: ignore[return-value]


def _available_platforms() -> list[str]:
    import openmm

    return [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]


def _has_generalized_born(system) -> bool:
    return any("GB" in type(force).__name__ for force in system.getForces())


def choose_platform(system, platform: str = "auto") -> list[str]:
    """Names of the platforms to try, in order, for ``platform`` (``"auto"`` or a name).

    ``auto``: CUDA > OpenCL > CPU > Reference, except that small systems without
    generalized Born solvent (≤ :data:`SMALL_SYSTEM_ATOMS` atoms) try Reference first.

    Raises:
        ValueError: a named platform that OpenMM does not have here.
    """
    available = _available_platforms()
    if platform != "auto":
        if platform not in available:
            raise FlowforceError(f"platform {platform!r} is not available here; choose auto or one of "
                                 f"{', '.join(available)} (run `flowforce doctor` to see why others are missing)")
        return [platform]
    order = list(PLATFORM_ORDER)
    if system.getNumParticles() <= SMALL_SYSTEM_ATOMS and not _has_generalized_born(system):
        order.remove("Reference")
        order.insert(0, "Reference")
    return [name for name in order if name in available]


def platform_properties(name: str, cpu_threads: int | None = None) -> dict[str, str]:
    """Context properties this package uses on platform ``name``: mixed precision on GPUs;
    on CPU, ``cpu_threads`` threads (None: OpenMM's default, all cores)."""
    if name in ("CUDA", "OpenCL"):
        return {"Precision": "mixed"}
    if name == "CPU" and cpu_threads is not None:
        return {"Threads": str(int(cpu_threads))}
    return {}


def _make_context(system, integrator_factory, platform: str, cpu_threads: int | None = None):
    """The first context that can be created on the candidate platforms, and its platform name."""
    import openmm

    failures = []
    for name in choose_platform(system, platform):
        integrator = integrator_factory()
        properties = platform_properties(name, cpu_threads)
        try:
            context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(name), properties)
        except Exception as error:  # OpenMMException: no device, driver too old, ...
            failures.append(f"{name}: {error}")
            continue
        return context, integrator, name
    raise RuntimeError("no OpenMM platform could create a context: " + "; ".join(failures))


def minimize_energy(system, positions_nm: np.ndarray, platform: str = "auto",
                    cpu_threads: int | None = None) -> tuple[np.ndarray, float, str]:
    """Local energy minimisation (OpenMM's L-BFGS, default tolerance) of ``(N, 3)`` nm positions.

    Returns:
        ``(positions (N, 3) nm float64, energy kJ/mol, platform name)``.

    Raises:
        FlowforceError: the energy is not finite after minimisation.
    """
    import openmm
    from openmm import unit

    context, _, name = _make_context(system, lambda: openmm.VerletIntegrator(0.001), platform, cpu_threads)
    context.setPositions(np.asarray(positions_nm, dtype=np.float64) * unit.nanometer)
    openmm.LocalEnergyMinimizer.minimize(context)
    state = context.getState(getPositions=True, getEnergy=True)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    if not math.isfinite(energy):
        raise FlowforceError(f"the potential energy is {energy} after minimisation: the start structure or the "
                             "System is broken (overlapping atoms, missing parameters, positions not in nm?)")
    return np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64), energy, name


def _steps(what: str, duration_fs: float, timestep_fs: float) -> int:
    steps = duration_fs / timestep_fs
    if steps < 1 - 1e-9 or abs(steps - round(steps)) > 1e-6 * max(1.0, steps):
        raise FlowforceError(f"{what} ({duration_fs:g} fs) must be a positive multiple of the time step "
                             f"({timestep_fs:g} fs)")
    return int(round(steps))


def run_reference_md(
    topology,
    system,
    positions,
    temperature: float = 300.0,
    time_ns: float = 1.0,
    save_every_ps: float = 1.0,
    timestep_fs: float | None = None,
    friction_per_ps: float = 1.0,
    seed: int = 0,
    platform: str = "auto",
    progress: bool = True,
    dcd: str | os.PathLike | None = None,
    equilibration_ps: float = 10.0,
    minimize: bool = True,
    cpu_threads: int | None = None,
) -> dict[str, Any]:
    """Minimise, equilibrate and run Langevin MD, recording positions, forces and energies.

    Args:
        topology: ``openmm.app.Topology`` (used for the DCD file).
        system: ``openmm.System``; not modified.
        positions: ``(N, 3)`` start positions in nm (array or OpenMM Quantity).
        temperature: K.
        time_ns: production length in ns; must be a multiple of ``save_every_ps``.
        save_every_ps: time between recorded frames in ps; a multiple of the time step.
        timestep_fs: integration time step in fs; default 1 fs, or 2 fs when the System has
            constraints (bonds to hydrogen rigid).
        friction_per_ps: Langevin friction coefficient in 1/ps.
        seed: determines the integrator's and the initial velocities' random numbers.
        platform: ``"auto"`` (see :func:`choose_platform`) or an OpenMM platform name.
        progress: show a tqdm progress bar (on stderr).
        dcd: also write the recorded frames to this DCD file (atomically at the end).
        equilibration_ps: unrecorded dynamics after minimisation, in ps (0: none).
        minimize: minimise the energy first (False: the caller's positions are already
            relaxed, e.g. minimised once for many replicas, or an MD snapshot).
        cpu_threads: threads of the CPU platform (None: all cores; 1 for parallel replicas).

    Returns:
        A dict with ``positions`` ``(T, N, 3)`` nm, ``forces`` ``(T, N, 3)`` kJ/mol/nm,
        ``energies`` ``(T,)`` kJ/mol (float64 numpy); the settings used (``temperature``,
        ``timestep_fs``, ``save_every_ps``, ``friction_per_ps``, ``seed``,
        ``equilibration_ps``, ``platform``); ``minimized_energy`` kJ/mol (of the start when
        ``minimize`` is False), ``steps`` (integration steps taken), ``wall_time_s``
        (all stages), ``production_wall_time_s``, ``simulated_ns`` (recorded), ``ns_per_day``
        (production speed), and how it ended: ``interrupted`` (Ctrl-C) and ``error``
        (``None``, or why the run stopped early, e.g. a non-finite energy). T is smaller
        than requested when the run stopped early.

    Raises:
        ValueError: bad settings (non-positive or non-multiple durations, unknown platform).
    """
    import openmm
    from openmm import app, unit
    from tqdm.auto import tqdm

    temperature = in_openmm_units(temperature, "temperature", "temperature")
    time_ns = in_openmm_units(time_ns, "time", "time_ns", 1e-3)
    save_every_ps = in_openmm_units(save_every_ps, "time", "save_every_ps")
    timestep_fs = in_openmm_units(timestep_fs, "time", "timestep_fs", 1e3)
    friction_per_ps = in_openmm_units(friction_per_ps, "friction", "friction_per_ps")
    equilibration_ps = in_openmm_units(equilibration_ps, "time", "equilibration_ps")
    positions = in_openmm_units(positions, "length", "positions")
    for name, value in (("temperature", temperature), ("time_ns", time_ns), ("save_every_ps", save_every_ps),
                        ("friction_per_ps", friction_per_ps)):
        if not (math.isfinite(value) and value > 0):
            raise FlowforceError(f"{name} must be a positive number, got {value!r}")
    if not (math.isfinite(equilibration_ps) and equilibration_ps >= 0):
        raise FlowforceError(f"equilibration_ps must be zero or positive, got {equilibration_ps!r}")
    if timestep_fs is None:
        timestep_fs = 2.0 if system.getNumConstraints() > 0 else 1.0
    if not (math.isfinite(timestep_fs) and timestep_fs > 0):
        raise FlowforceError(f"timestep_fs must be a positive number, got {timestep_fs!r}")
    steps_per_frame = _steps("save_every_ps", save_every_ps * 1000.0, timestep_fs)
    n_frames = _steps("time_ns", time_ns * 1e6, save_every_ps * 1000.0)
    equilibration_steps = _steps("equilibration_ps", equilibration_ps * 1000.0, timestep_fs) if equilibration_ps else 0
    positions_nm = positions.value_in_unit(unit.nanometer) if unit.is_quantity(positions) else positions
    positions_nm = np.asarray(positions_nm, dtype=np.float64)
    if positions_nm.shape != (system.getNumParticles(), 3):
        raise FlowforceError(f"positions have shape {positions_nm.shape}, the System has {system.getNumParticles()} "
                             "particles: expected (particles, 3) in nm")
    integrator_seed, velocity_seed = derive_seeds(seed)

    def make_integrator():
        integrator = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, friction_per_ps / unit.picosecond,
                                                     timestep_fs * unit.femtosecond)
        integrator.setRandomNumberSeed(integrator_seed)
        return integrator

    started = time.perf_counter()
    context, integrator, platform_name = _make_context(system, make_integrator, platform, cpu_threads)
    context.setPositions(positions_nm * unit.nanometer)
    if minimize:
        openmm.LocalEnergyMinimizer.minimize(context)
    minimized = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    if not math.isfinite(minimized):
        raise FlowforceError(f"the potential energy of the start is {minimized}: the start structure or the "
                             "System is broken (overlapping atoms, missing parameters, positions not in nm?)")
    context.setVelocitiesToTemperature(temperature * unit.kelvin, velocity_seed)

    frames_pos: list[np.ndarray] = []
    frames_force: list[np.ndarray] = []
    frames_energy: list[float] = []
    interrupted, error = False, None
    dcd_tmp = dcd_file = dcd_handle = None
    if dcd is not None:
        dcd = Path(dcd)
        dcd.parent.mkdir(parents=True, exist_ok=True)
        dcd_tmp = dcd.with_name(f".{dcd.name}.tmp")
        dcd_handle = open(dcd_tmp, "wb")
        dcd_file = app.DCDFile(dcd_handle, topology, timestep_fs * unit.femtosecond, firstStep=equilibration_steps,
                               interval=steps_per_frame)
    production_started = time.perf_counter()
    try:
        # Equilibrate in 1 ps chunks so that Ctrl-C is noticed promptly.
        chunk = max(1, int(round(1000.0 / timestep_fs)))
        with tqdm(total=equilibration_steps, desc="equilibrate", unit="step", disable=not progress or
                  equilibration_steps == 0, leave=False) as bar:
            done = 0
            while done < equilibration_steps:
                n = min(chunk, equilibration_steps - done)
                integrator.step(n)
                done += n
                bar.update(n)
        production_started = time.perf_counter()
        with tqdm(total=n_frames, desc="md", unit="frame", disable=not progress) as bar:
            for frame in range(n_frames):
                integrator.step(steps_per_frame)
                state = context.getState(getPositions=True, getForces=True, getEnergy=True)
                energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
                if not math.isfinite(energy):
                    error = (f"the potential energy became {energy} at frame {frame}: the simulation blew up; "
                             f"use a smaller time step (now {timestep_fs:g} fs) or check the System")
                    break
                xyz = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
                frames_pos.append(np.asarray(xyz, dtype=np.float64))
                frames_force.append(np.asarray(state.getForces(asNumpy=True).value_in_unit(
                    unit.kilojoule_per_mole / unit.nanometer), dtype=np.float64))
                frames_energy.append(energy)
                if dcd_file is not None:
                    dcd_file.writeModel(xyz * unit.nanometer)
                bar.update(1)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if dcd_handle is not None:
            dcd_handle.close()
            if frames_pos:
                os.replace(dcd_tmp, dcd)
            else:
                os.unlink(dcd_tmp)
    finished = time.perf_counter()

    n_atoms = system.getNumParticles()
    recorded_ns = len(frames_pos) * save_every_ps / 1000.0
    production_s = finished - production_started
    return {
        "positions": np.array(frames_pos).reshape(-1, n_atoms, 3),
        "forces": np.array(frames_force).reshape(-1, n_atoms, 3),
        "energies": np.array(frames_energy, dtype=np.float64),
        "temperature": float(temperature),
        "timestep_fs": float(timestep_fs),
        "save_every_ps": float(save_every_ps),
        "friction_per_ps": float(friction_per_ps),
        "seed": int(seed),
        "equilibration_ps": float(equilibration_ps),
        "platform": platform_name,
        "minimized_energy": float(minimized),
        "steps": int(context.getStepCount()),
        "wall_time_s": finished - started,
        "production_wall_time_s": production_s,
        "simulated_ns": recorded_ns,
        "ns_per_day": recorded_ns / production_s * 86400.0 if production_s > 0 and recorded_ns > 0 else 0.0,
        "interrupted": interrupted,
        "error": error,
    }
