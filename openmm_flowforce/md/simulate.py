"""Langevin MD with a flow potential, with a check that the run has not blown up.

:func:`simulate` builds the ``app.Simulation`` with
:func:`~openmm_flowforce.md.simulation.create_simulation` (a ``LangevinMiddleIntegrator``, or
ESH dynamics with ``integrator="esh"``, whose frames need the weights it writes beside them),
runs it from the topology file's positions, writes the trajectory with
OpenMM's own ``DCDReporter`` and, optionally, a CSV log with its ``StateDataReporter``.

Every report interval a :class:`StabilityReporter` checks that the energies and positions
are finite and that neither the potential energy has moved, nor the kinetic energy grown,
by more than ``explosion_factor·N·kT`` (default 100 kT per atom) from the start. If
they have, the run stops with :class:`SimulationBlewUp`, after writing the last state that
passed the check as a PDB next to the trajectory. Units: nm, ps, kJ/mol, K.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..conventions import kT
from ..errors import FlowforceError
from ..conventions import in_openmm_units
from ..io import check_outputs
from .simulation import PLATFORMS, create_simulation, platform_by_name, read_molecule_pdb

__all__ = ["INTEGRATORS", "PLATFORMS", "SimulationBlewUp", "SimulationResult", "StabilityReporter", "esh_weights_path",
           "simulate"]

#: Default limit on |U − U₀| and on the kinetic energy, in kT per atom.
EXPLOSION_FACTOR = 100.0
#: ``integrator`` values of :func:`simulate`.
INTEGRATORS = ("langevin", "esh")


def esh_weights_path(out: str | os.PathLike) -> Path:
    """``TRAJ.dcd`` → ``TRAJ.esh_weights.csv``: the per-frame log weights of an ESH run."""
    out = Path(out)
    return out.with_name(out.stem + ".esh_weights.csv")


class SimulationBlewUp(RuntimeError):
    """The energy became non-finite or exploded.

    Attributes:
        step: the step at which the check failed.
        potential_energy: kJ/mol at that step.
        last_good_pdb: the PDB file holding the last state that passed the check.
    """

    def __init__(self, message: str, step: int, potential_energy: float, last_good_pdb: Path):
        super().__init__(message)
        self.step, self.potential_energy, self.last_good_pdb = step, potential_energy, last_good_pdb


@dataclass
class SimulationResult:
    """What :func:`simulate` did. Energies kJ/mol, times s."""

    steps: int
    trajectory: Path
    report: Path | None
    platform: str
    backend: str
    temperature: float
    final_potential_energy: float
    seconds: float

    @property
    def us_per_step(self) -> float:
        return 1e6 * self.seconds / max(self.steps, 1)


class StabilityReporter:
    """OpenMM reporter that raises :class:`SimulationBlewUp` when the run explodes.

    Args:
        interval: steps between checks.
        reference_energy: U₀ (kJ/mol) at the start.
        limit: kJ/mol; a check fails when |U − U₀| or the kinetic energy exceeds it, or
            anything is non-finite.
        last_good_pdb: where the last good positions go on failure.
        positions: nm ``(N, 3)``, the initial (good) positions.
        step_flag: the flag the failure message suggests making smaller.
    """

    def __init__(self, interval: int, reference_energy: float, limit: float, last_good_pdb: Path,
                 positions: np.ndarray, step_flag: str = "--timestep-fs"):
        self.interval, self.reference_energy, self.limit = int(interval), float(reference_energy), float(limit)
        self.step_flag = step_flag
        self.last_good_pdb = last_good_pdb
        self.last_good_positions, self.last_good_step = np.asarray(positions), 0

    def describeNextReport(self, simulation: Any) -> dict[str, Any]:  # noqa: N802 - OpenMM protocol
        steps = self.interval - simulation.currentStep % self.interval
        return {"steps": steps, "periodic": False, "include": ["positions", "energy"]}

    def report(self, simulation: Any, state: Any) -> None:
        from openmm import app, unit

        potential = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        kinetic = state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole)
        positions = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        finite = math.isfinite(potential) and math.isfinite(kinetic) and bool(np.isfinite(positions).all())
        change = abs(potential - self.reference_energy) if finite else math.inf
        if finite and change <= self.limit and kinetic <= self.limit:
            self.last_good_positions, self.last_good_step = np.array(positions), simulation.currentStep
            return
        with open(self.last_good_pdb, "w") as handle:
            app.PDBFile.writeFile(simulation.topology, self.last_good_positions * unit.nanometer, handle)
        why = ("is not finite" if not finite else
               f"moved {change:.4g} kJ/mol from the start" if change > self.limit else
               f"kinetic energy {kinetic:.4g} kJ/mol")
        raise SimulationBlewUp(
            f"simulation blew up at step {simulation.currentStep}: potential energy {potential:.6g} kJ/mol, "
            f"kinetic {kinetic:.6g} kJ/mol (the energy {why}; limit {self.limit:.4g} kJ/mol). "
            f"Last good state (step {self.last_good_step}) written to {self.last_good_pdb}. "
            f"Try a smaller {self.step_flag}, or check the model (is it trained? at this temperature?)",
            simulation.currentStep, potential, self.last_good_pdb)


def simulate(model: Any, topology_pdb: str | os.PathLike, steps: int, out: str | os.PathLike,
             platform: str = "auto", timestep_fs: float = 1.0, temperature: float | None = None,
             backend: str = "auto", seed: int = 0, report: str | os.PathLike | None = None,
             report_interval: int = 100, friction_per_ps: float = 1.0,
             explosion_factor: float = EXPLOSION_FACTOR, progress: bool = True, integrator: str = "langevin",
             esh_step_nm: float = 0.005, esh_refresh: int = 100) -> SimulationResult:
    """Langevin MD of one molecule under its flow potential (the Simulation from
    :func:`~openmm_flowforce.md.simulation.create_simulation`).

    Args:
        model: exported ``.pt``, checkpoint path, or ``BoltzmannGenerator``.
        topology_pdb: PDB of the molecule (atoms in the model's order); its positions start the run.
        steps: MD steps.
        out: DCD trajectory, one frame every ``report_interval`` steps.
        platform: ``auto`` (OpenMM's fastest), ``CUDA``, ``OpenCL``, ``CPU`` or ``Reference``.
        timestep_fs: femtoseconds (or an ``openmm.unit`` Quantity of time).
        temperature: K or Quantity; default: the exported file's, or 300 K for a checkpoint.
        backend: force backend (``auto``, ``torchforce``, ``pythonforce``).
        seed: seeds the initial velocities and the Langevin noise (OpenMM treats 0 as
            "random", so ``seed + 1`` is what OpenMM receives: runs with equal seeds are
            identical on the Reference platform).
        report: optional CSV log of step, time, energies, temperature and speed.
        report_interval: steps between frames, log lines and stability checks.
        friction_per_ps: Langevin friction (1/ps, or a Quantity).
        explosion_factor: stability limit in kT per atom (module docstring).
        progress: show a tqdm progress bar (on a terminal).
        integrator: ``"langevin"`` or ``"esh"``: ESH dynamics
            (:class:`~openmm_flowforce.md.esh.ESHIntegrator`, arXiv 2111.02434), whose frames
            sample the Boltzmann distribution only with the weights written, one row per
            frame, to ``TRAJ.esh_weights.csv`` (:func:`esh_weights_path`); its velocities and
            kinetic energy are not physical, and ``timestep_fs`` / ``friction_per_ps`` are unused.
        esh_step_nm: ESH step (nm moved per step, over all coordinates).
        esh_refresh: ESH direction refreshment interval in steps (0: never).

    Raises:
        OutputError: ``out`` or ``report`` is an input or cannot be written (checked first).
        ValueError: bad arguments, unknown platform, topology that does not match the model.
        SimulationBlewUp: the stability check failed (last good state saved as PDB).
    """
    from openmm import app, unit
    from tqdm.auto import tqdm

    from ..export.backends import resolve_backend, resolve_potential
    from .esh import ESHIntegrator, ESHWeightsReporter, check_esh_system

    if int(steps) < 1 or int(report_interval) < 1:
        raise FlowforceError(f"steps and report_interval must be ≥ 1, got steps={steps}, "
                             f"report_interval={report_interval}")
    timestep_fs = in_openmm_units(timestep_fs, "time", "timestep_fs", 1e3)
    friction_per_ps = in_openmm_units(friction_per_ps, "friction", "friction_per_ps")
    if not (timestep_fs > 0 and math.isfinite(timestep_fs)):
        raise FlowforceError(f"timestep_fs must be a positive number of femtoseconds, got {timestep_fs}")
    if not 0 <= int(seed) < 2**31 - 1:
        raise FlowforceError(f"seed must be in [0, 2^31 − 2], got {seed}")
    platform_by_name(platform)  # a bad name fails before any file is read
    if integrator not in INTEGRATORS:
        raise FlowforceError(f"unknown integrator {integrator!r}; valid: {', '.join(INTEGRATORS)}")
    esh = integrator == "esh"
    inputs = {"topology_pdb": topology_pdb, **({"model": model} if isinstance(model, (str, os.PathLike)) else {})}
    check_outputs({"out": out, "report": report, **({"ESH weights": esh_weights_path(out)} if esh else {})}, inputs)
    pdb = read_molecule_pdb(topology_pdb)
    source = resolve_potential(model, temperature)
    chosen = resolve_backend(backend, source)
    esh_integrator = ESHIntegrator(esh_step_nm, source.temperature, int(esh_refresh)) if esh else None
    simulation = create_simulation(pdb.topology, source, pdb.positions, timestep=timestep_fs / 1000.0,
                                   friction=friction_per_ps, platform=platform, backend=chosen.name, seed=int(seed),
                                   integrator=esh_integrator)
    system = simulation.system
    if esh:
        check_esh_system(system)
    temp_k = source.temperature
    simulation.context.setVelocitiesToTemperature(temp_k * unit.kelvin, int(seed) + 1)
    start = simulation.context.getState(getEnergy=True, getPositions=True)
    energy0 = start.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    if not math.isfinite(energy0):
        raise FlowforceError(f"the starting positions in {topology_pdb} have a non-finite energy ({energy0}); "
                             "are they the molecule's atoms, in nm-sensible geometry?")

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n_atoms = system.getNumParticles()
    stability = StabilityReporter(report_interval, energy0, explosion_factor * n_atoms * kT(temp_k),
                                  out.with_name(out.stem + ".last_good.pdb"),
                                  start.getPositions(asNumpy=True).value_in_unit(unit.nanometer),
                                  step_flag="--esh-step" if esh else "--timestep-fs")
    dcd = app.DCDReporter(str(out), report_interval)
    # The stability check runs first, so a blown-up frame never reaches the trajectory.
    simulation.reporters.extend([stability, dcd])
    weights = ESHWeightsReporter(str(esh_weights_path(out)), report_interval) if esh else None
    if weights is not None:
        simulation.reporters.append(weights)
    log = None
    if report is not None:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        log = open(report, "w")
        simulation.reporters.append(app.StateDataReporter(
            log, report_interval, step=True, time=True, potentialEnergy=True, kineticEnergy=True,
            totalEnergy=True, temperature=not esh, speed=True, separator=","))  # ESH has no temperature
    began = time.perf_counter()
    try:
        with tqdm(total=int(steps), unit="step", desc="flowforce simulate", disable=not progress or None) as bar:
            done = 0
            while done < steps:
                chunk = min(int(report_interval), int(steps) - done)
                simulation.step(chunk)
                done += chunk
                bar.update(chunk)
    finally:
        dcd._out.close()  # DCDReporter has no public close(); flush the trajectory now
        if log is not None:
            log.close()
        if weights is not None:
            weights.close()
    seconds = time.perf_counter() - began
    final = simulation.context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    return SimulationResult(steps=int(steps), trajectory=out, report=Path(report) if report else None,
                            platform=simulation.context.getPlatform().getName(), backend=chosen.name,
                            temperature=temp_k, final_potential_energy=final, seconds=seconds)
