"""ESH dynamics as an OpenMM ``CustomIntegrator``: :class:`ESHIntegrator`, for any System.

Energy Sampling Hamiltonian dynamics (Ver Steeg & Galstyan, NeurIPS 2021, arXiv
2111.02434) with H = U(x)/kT + (d/2)·log(|v|²/d), integrated in the paper's scaled time by
the ESH-leapfrog with the closed-form (û, r) update; the maths, and why samples need
weights, are in :mod:`openmm_flowforce.samplers.esh` (the torch version of the same
steps, which a test checks step for step against this one).

**What this integrator is not.** It does not run physical dynamics and does not sample
the canonical ensemble frame by frame:

* A step moves the configuration a distance ``step_size`` (nm, Euclidean over all mobile
  coordinates, no mass weighting) along the unit direction û. The "step" is not a time
  step; the trajectory's time axis means nothing.
* The context's velocities hold û, a unit vector over all 3N coordinates, not velocities
  in nm/ps. The kinetic energy OpenMM reports is the ESH kinetic term
  kT·(d/2)·log(|v|²/d) (so potential + kinetic = kT·H, conserved to O(step²)); it is
  negative, and the "temperature" a ``StateDataReporter`` derives from it is meaningless.
* Frames sample exp(−U/kT) only **with weights** w ∝ e^r (the global ``r`` =
  log|v|, :meth:`ESHIntegrator.log_weight`): unweighted frames are too hot by d/(d − 1).
  :class:`ESHWeightsReporter` writes r next to every frame; normalise e^r over one run.

Systems with constraints or a ``CMMotionRemover`` (which would edit û behind the
integrator's back and change d) are refused by :func:`check_esh_system`. Particles of
mass 0 are not moved by the ESH step and do not count in d; Systems with virtual sites
have not been tested. Only the Reference platform has been tested (the integrator is
plain ``CustomIntegrator`` expressions, which every platform compiles; per-DOF
arithmetic is single precision on GPU platforms unless mixed/double is chosen).
"""
from __future__ import annotations

import math
from typing import IO, Any

from ..conventions import kT as thermal_energy
from ..errors import FlowforceError

__all__ = ["ESHIntegrator", "ESHWeightsReporter", "check_esh_system"]

#: |f| below this (kJ/mol/nm) counts as zero force.
_TINY_FORCE = 1e-30


def check_esh_system(system: Any) -> None:
    """Refuse Systems the ESH integrator cannot run correctly.

    Raises:
        FlowforceError: constraints or a CMMotionRemover (each named with the fix).
    """
    import openmm

    if system.getNumConstraints() > 0:
        raise FlowforceError(f"the System has {system.getNumConstraints()} constraints, which ESH dynamics does not "
                             "support; build it with constraints=None (and rigidWater=False)")
    for i, force in enumerate(system.getForces()):
        if isinstance(force, openmm.CMMotionRemover):
            raise FlowforceError(f"force {i} of the System is a CMMotionRemover, which would rescale the ESH "
                                 "direction vector; remove it (system.removeForce) before using ESHIntegrator")


def _integrator_base() -> type:
    import openmm

    return openmm.CustomIntegrator


class ESHIntegrator(_integrator_base()):  # type: ignore[misc]
    """ESH-leapfrog as a ``CustomIntegrator`` (arXiv 2111.02434).

    Args:
        step_size: ESH step ε in nm: each step moves the configuration this far (Euclidean
            norm over all mobile coordinates). About √(3N)·0.0005 nm is the distance a
            1 fs MD step covers at 300 K; ESH tolerates larger steps.
        temperature: K; sets kT, the unit of the reduced energy U/kT.
        refresh_every: redraw the direction û uniformly every so many steps (0: never,
            a deterministic, possibly non-ergodic run).

    Global variables: ``r`` (log speed = log weight of the current frame), ``ndof`` (d,
    the number of mobile coordinates, set on the first step), ``kT``, ``eps``.
    Per-DOF: ``v`` holds û (normalised at every step, so any velocities set on the
    context give the starting direction; zero velocities are replaced by a random one),
    ``mobile`` (1 for particles with mass > 0).
    """

    def __init__(self, step_size: float, temperature: float, refresh_every: int = 0):
        step_size = float(step_size)
        if not (step_size > 0 and math.isfinite(step_size)):
            raise FlowforceError(f"the ESH step_size must be a positive number of nm, got {step_size!r}")
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 0:
            raise FlowforceError(f"refresh_every must be an integer ≥ 0 (0: never), got {refresh_every!r}")
        super().__init__(step_size)  # OpenMM's "step size" (ps) is only used for the time axis
        self.addGlobalVariable("eps", step_size)
        self.addGlobalVariable("kT", thermal_energy(float(temperature)))
        self.addGlobalVariable("r", 0.0)
        self.addGlobalVariable("ndof", 0.0)
        self.addGlobalVariable("refresh_every", float(refresh_every))
        self.addGlobalVariable("since_refresh", 0.0)
        for name in ("norm2", "gnorm", "fu", "c", "delta", "zeta", "den"):
            self.addGlobalVariable(name, 0.0)
        self.addPerDofVariable("mobile", 0.0)
        # The ESH kinetic term, summed over the d mobile coordinates: kT·(d·r − (d/2)·log d).
        self.setKineticEnergyExpression("mobile*kT*(r - 0.5*log(max(ndof, 1)))")

        self.beginIfBlock("ndof < 0.5")
        self.addComputePerDof("mobile", "1 - delta(m)")
        self.addComputeSum("ndof", "mobile")
        self.endBlock()
        self.addUpdateContextState()
        self.beginIfBlock("refresh_every > 0")
        self.addComputeGlobal("since_refresh", "since_refresh + 1")
        self.beginIfBlock("since_refresh > refresh_every")
        self.addComputePerDof("v", "gaussian")
        self.addComputeGlobal("since_refresh", "1")
        self.endBlock()
        self.endBlock()
        self._normalise_direction()
        self._half_step()
        self.addComputePerDof("x", "x + eps*v")
        self._half_step()

    def _normalise_direction(self) -> None:
        self.addComputePerDof("v", "v*mobile")
        self.addComputeSum("norm2", "v*v")
        self.beginIfBlock("norm2 = 0")  # no direction given: draw one
        self.addComputePerDof("v", "gaussian*mobile")
        self.addComputeSum("norm2", "v*v")
        self.endBlock()
        self.addComputePerDof("v", "v/sqrt(norm2)")

    def _half_step(self) -> None:
        """Closed-form (û, r) update over ε/2 with the force at the current x (see the module
        docstring of :mod:`openmm_flowforce.samplers.esh` for the formula)."""
        self.addComputeSum("norm2", "mobile*f*f")
        self.addComputeSum("fu", "mobile*f*v")
        self.addComputeGlobal("gnorm", "sqrt(norm2)/kT")
        self.addComputeGlobal("c", f"max(-1, min(1, fu/(kT*max(gnorm, {_TINY_FORCE}))))")
        self.addComputeGlobal("delta", "0.5*eps*gnorm/ndof")
        self.addComputeGlobal("zeta", "exp(-delta)")
        self.addComputeGlobal("den", "(1 + c) + (1 - c)*zeta*zeta")
        self.addComputePerDof("v", f"mobile*(2*zeta*v + ((1 - zeta*zeta) + c*(1 - zeta)^2)*f/(kT*max(gnorm, "
                                   f"{_TINY_FORCE})))/den")
        self.addComputeGlobal("r", "r + delta + log(den/2)")
        # Renormalise: the closed form keeps |û| = 1 only up to rounding (single precision on GPUs).
        self.addComputeSum("norm2", "v*v")
        self.addComputePerDof("v", "v/sqrt(norm2)")

    # -- what reporters need ---------------------------------------------------------------
    def log_weight(self) -> float:
        """r = log|v| of the current frame: its unnormalised log weight (see the module docstring)."""
        return self.getGlobalVariableByName("r")

    def hamiltonian(self, potential_energy_kj: float) -> float:
        """H = U/kT + d·r − (d/2)·log d (reduced), for the current frame's U in kJ/mol."""
        d = self.getGlobalVariableByName("ndof")
        if d < 1:
            raise FlowforceError("the ESH integrator has not taken a step yet (d is set on the first step)")
        return potential_energy_kj / self.getGlobalVariableByName("kT") + d * self.log_weight() - 0.5 * d * math.log(d)


class ESHWeightsReporter:
    """OpenMM reporter writing ``step,log_weight,esh_hamiltonian`` (CSV) for ESH runs.

    Give it the same interval as the trajectory reporter: row i then holds the log weight
    r of frame i. Weighted averages over frames use w_i = exp(r_i − max r) / Σ.

    Args:
        file: path or open text file.
        interval: steps between rows.
    """

    def __init__(self, file: str | IO[str], interval: int):
        self._own = isinstance(file, str)
        self._out: IO[str] = open(file, "w") if isinstance(file, str) else file
        self.interval = int(interval)
        self._out.write("step,log_weight,esh_hamiltonian\n")

    def describeNextReport(self, simulation: Any) -> dict[str, Any]:  # noqa: N802 - OpenMM protocol
        return {"steps": self.interval - simulation.currentStep % self.interval, "periodic": False,
                "include": ["energy"]}

    def report(self, simulation: Any, state: Any) -> None:
        from openmm import unit

        integrator = simulation.integrator
        if not isinstance(integrator, ESHIntegrator):
            raise FlowforceError("ESHWeightsReporter needs a Simulation whose integrator is an ESHIntegrator")
        potential = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        self._out.write(f"{simulation.currentStep},{integrator.log_weight()!r},"
                        f"{integrator.hamiltonian(potential)!r}\n")
        self._out.flush()

    def close(self) -> None:
        if self._own:
            self._out.close()
