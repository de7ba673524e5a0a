"""Probes of the OpenMM force backends on a toy potential (E = Σ|r|², F = −2r): does a force of
each backend give the right energy and forces in a real Context on a platform?

Backend diagnostics live with the backends (:mod:`.backends` asks "does TorchForce work here?"
through :func:`check_force`); ``flowforce doctor`` (:mod:`openmm_flowforce.md.doctor`) reports
them. Heavy and fragile imports (openmm, torch, openmmtorch) happen inside the functions: a
broken install must become a FAIL row, not a traceback.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

__all__ = ["FIX_HINT", "FORCE_BACKENDS", "TOLERANCES", "CheckResult", "check_force", "explain_error",
           "quiet_openmmtorch_logging", "toy_energy", "toy_forces"]

#: The install command that restores a working torch / openmm-torch pair.
FIX_HINT = (
    'pip install "torch>=2.10,<2.13" acellera-openmmtorch-cu13==1.10 '
    "(or acellera-openmmtorch-cpu==1.10 on CPU-only machines)"
)

#: Tolerances (rtol, atol) per floating-point precision of the platform.
#: float32: as OpenMM's own tests for single/mixed precision; float64: what the Reference
#: platform actually achieves on this toy (errors ~1e-15), with margin.
TOLERANCES: dict[str, tuple[float, float]] = {"float32": (1e-5, 1e-4), "float64": (1e-9, 1e-8)}

# Messages that mean the compiled openmm-torch does not match the installed libtorch.
_ABI_MISMATCH = re.compile(r"interpreter|undefined symbol|\babi\b|libtorch|libc10|GLIBCXX", re.IGNORECASE)

EnergyFn = Callable[[np.ndarray], float]
ForcesFn = Callable[[np.ndarray], np.ndarray]


def toy_energy(positions: np.ndarray) -> float:
    """E = Σ|r|² in kJ/mol for positions ``(N, 3)`` in nm."""
    return float(np.sum(np.asarray(positions, dtype=np.float64) ** 2))


def toy_forces(positions: np.ndarray) -> np.ndarray:
    """F = −∇E = −2r in kJ/mol/nm, shape ``(N, 3)``, for positions ``(N, 3)`` in nm."""
    return -2.0 * np.asarray(positions, dtype=np.float64)


@dataclass
class CheckResult:
    """One row of the report: a named check on one platform."""

    name: str
    platform: str
    passed: bool
    detail: str

    @property
    def status(self) -> str:
        return "PASS" if self.passed else "FAIL"


@contextlib.contextmanager
def quiet_openmmtorch_logging() -> Iterator[None]:
    # openmmtorch imports simtk.openmm, which logs a deprecation warning on the root logger
    # that would land in the middle of the report; it is not something the user can act on.
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)



def _precision(context: Any) -> str:
    """'float32' or 'float64': the precision in which the context's platform computes forces."""
    platform = context.getPlatform()
    if "Precision" in platform.getPropertyNames():
        return "float64" if platform.getPropertyValue(context, "Precision") == "double" else "float32"
    # Reference computes in double and has no Precision property; CPU computes in float.
    return "float64" if platform.supportsDoublePrecision() else "float32"


# --------------------------------------------------------------------------- force backends


def _toy_python_computation(state: Any) -> tuple[float, np.ndarray]:
    """openmm.PythonForce callback: E = Σ|r|² (kJ/mol) and F = −2r (kJ/mol/nm), r in nm."""
    import openmm.unit as unit

    positions = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    return float(np.sum(positions**2)), -2.0 * positions


def _python_force_factory(_workdir: str) -> Any:
    import openmm

    if not hasattr(openmm, "PythonForce"):
        raise RuntimeError(
            f"openmm {openmm.Platform.getOpenMMVersion()} has no PythonForce (added in 8.5); "
            'upgrade with: pip install "openmm>=8.5"'
        )
    return openmm.PythonForce(_toy_python_computation)


def _write_toy_torchscript(path: str) -> None:
    """Save a TorchScript module computing E = Σ|r|² from positions ``(N, 3)`` in nm."""
    import torch

    class SquaredNorm(torch.nn.Module):
        def forward(self, positions: torch.Tensor) -> torch.Tensor:
            return torch.sum(positions**2)

    # openmm-torch loads TorchScript files only; torch >= 2.10 warns that jit.script is
    # deprecated, which is not actionable for the user of the doctor.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=DeprecationWarning)
        torch.jit.script(SquaredNorm()).save(path)


def _torch_force_factory(workdir: str) -> Any:
    with quiet_openmmtorch_logging():
        import openmmtorch

    path = os.path.join(workdir, "squared_norm.pt")
    if not os.path.exists(path):
        _write_toy_torchscript(path)
    return openmmtorch.TorchForce(path)


#: Force backends under test: check name → factory(workdir) → openmm.Force.
FORCE_BACKENDS: dict[str, Callable[[str], Any]] = {
    "torchforce": _torch_force_factory,
    "pythonforce": _python_force_factory,
}


def explain_error(check_name: str, error: BaseException) -> str:
    """One-line description of ``error``, with the install fix when torch and openmm-torch mismatch."""
    message = " ".join(f"{type(error).__name__}: {error}".split())
    if len(message) > 300:
        message = message[:297] + "..."
    if check_name == "torchforce" and (isinstance(error, ImportError) or _ABI_MISMATCH.search(str(error))):
        message += f" -- openmm-torch and torch do not match (or openmm-torch is missing); fix: {FIX_HINT}"
    return message


def check_force(
    check_name: str,
    force_factory: Callable[[str], Any],
    platform_name: str,
    positions: np.ndarray,
    workdir: str,
    expected_energy: EnergyFn = toy_energy,
    expected_forces: ForcesFn = toy_forces,
) -> CheckResult:
    """Evaluate one force backend in a real Context and compare with the expected values.

    Args:
        check_name: name of the row in the report (``"torchforce"``, ``"pythonforce"``).
        force_factory: builds the ``openmm.Force`` under test; gets a scratch directory.
        platform_name: OpenMM platform to create the Context on.
        positions: ``(N, 3)`` positions in nm.
        workdir: scratch directory for files the factory writes (e.g. TorchScript).
        expected_energy: truth for the energy in kJ/mol, from positions in nm.
        expected_forces: truth for the forces ``(N, 3)`` in kJ/mol/nm.

    Returns:
        A PASS when energy and every force component agree within the platform's tolerance
        (``|a − b| ≤ atol + rtol·|b|``, see :data:`TOLERANCES`); otherwise a FAIL whose
        detail says what differed or which error was raised. Never raises for a broken
        install.
    """
    try:
        import openmm
        import openmm.unit as unit

        system = openmm.System()
        for _ in range(len(positions)):
            system.addParticle(1.0)
        system.addForce(force_factory(workdir))
        context = openmm.Context(
            system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform_name)
        )
        try:
            context.setPositions(positions)
            state = context.getState(getEnergy=True, getForces=True)
            energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
            forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
            precision = _precision(context)
        finally:
            del context
    except Exception as error:  # noqa: BLE001 - a broken install is a FAIL row, not a crash
        return CheckResult(check_name, platform_name, False, explain_error(check_name, error))

    rtol, atol = TOLERANCES[precision]
    want_energy = float(expected_energy(positions))
    want_forces = np.asarray(expected_forces(positions), dtype=np.float64)
    forces = np.asarray(forces, dtype=np.float64)
    energy_error = abs(energy - want_energy)
    energy_ok = math.isfinite(energy) and energy_error <= atol + rtol * abs(want_energy)
    if forces.shape != want_forces.shape:
        return CheckResult(check_name, platform_name, False, f"forces have shape {forces.shape}, expected {want_forces.shape}")
    force_errors = np.abs(forces - want_forces)
    forces_ok = bool(np.all(np.isfinite(forces)) and np.all(force_errors <= atol + rtol * np.abs(want_forces)))
    detail = f"{precision}: |dE|={energy_error:.1e} max|dF|={force_errors.max():.1e} (rtol={rtol:g}, atol={atol:g})"
    if not energy_ok:
        detail += f"; energy {energy:.6g} kJ/mol, expected {want_energy:.6g}"
    if not forces_ok:
        detail += "; forces differ from expected"
    return CheckResult(check_name, platform_name, energy_ok and forces_ok, detail)
