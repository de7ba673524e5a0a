"""Molecule targets: the OpenMM energy of one molecule on flat Cartesian coordinates.

:class:`MoleculeTarget` turns :class:`~openmm_flowforce.targets.openmm_energy.OpenMMEnergy`
(positions ``(B, N, 3)`` nm → u = E/kT) into the flat-vector target the energy-only
samplers work on: ``energy(x)`` for ``x`` of shape ``(B, 3N)`` (nm, atom-major, i.e.
``x.reshape(B, N, 3)``), reduced units (kT). It also carries what a flow on internal
coordinates needs to be built *without any MD data*: the topology, the System (its
harmonic bond and angle terms give the bond/angle normalisation) and the built-in
structure (the centres of the narrow torsions).

Energy regularisation. An untrained flow places some atoms on top of each other; the
Lennard-Jones r⁻¹² term then gives energies of 10¹⁰ kT and more, and OpenMM may return
inf or NaN for exact overlaps. As in FAB's alanine-dipeptide target (Midgley et al., ICLR
2023, arXiv 2208.01893, their code's ``energy_cut``/``energy_max``), energies above
``energy_cut`` (kT) grow only logarithmically,

    u_reg = u                          for u ≤ cut,
    u_reg = cut + log(1 + u − cut)     for u > cut        (C¹ at the cut),

and are capped at ``energy_max``; a non-finite energy becomes ``energy_max`` (with zero
gradient). With the default cut of 10⁸ kT nothing a Boltzmann weight can see is changed
(exp(−10⁸) = 0 in float64); the regularisation only keeps every number finite, so AIS
weights, HMC acceptance and the replay buffer never meet inf or NaN.

The built-in systems are those of ``flowforce md --system alanine-dipeptide`` (amber14-all,
no cutoff, no constraints, vacuum or OBC2): :func:`builtin_molecule_system` builds the same
System with the same OpenMM calls, and a test checks that both give equal energies.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

from ..conventions import kT as thermal_energy
from ..errors import FlowforceError
from .openmm_energy import OpenMMEnergy

Tensor = torch.Tensor

#: Force field of the built-in molecules (``flowforce md``'s default, amber14-all).
BUILTIN_FORCEFIELD: tuple[str, ...] = ("amber14-all.xml",)
#: Solvent → extra force-field files (the ``vacuum`` / ``implicit`` = OBC2 of ``flowforce md``).
BUILTIN_SOLVENTS: dict[str, tuple[str, ...]] = {"vacuum": (), "implicit": ("implicit/obc2.xml",)}
#: Platform per solvent when none is given, the fastest measured for one 22-atom frame at a
#: time: Reference for vacuum (0.12 ms/frame with forces), CPU with one thread for OBC2
#: (0.24 ms/frame; the Reference platform's GB takes 4-6 ms).
DEFAULT_PLATFORMS: dict[str, str] = {"vacuum": "Reference", "implicit": "CPU"}
#: Default regularisation (kT), the values of FAB's alanine-dipeptide experiments.
DEFAULT_ENERGY_CUT = 1e8
DEFAULT_ENERGY_MAX = 1e20


def lin_log_cut(u: Tensor, cut: float, maximum: float) -> Tensor:
    """Regularised reduced energy ``(B,)`` (module docstring); non-finite → ``maximum``."""
    excess = torch.clamp(torch.nan_to_num(u - cut, nan=0.0, posinf=0.0), min=0.0)
    reg = torch.where(u > cut, cut + torch.log1p(excess), u)
    reg = torch.clamp(reg, max=maximum)
    return torch.where(torch.isfinite(u), reg, torch.full_like(reg, maximum))


@functools.lru_cache(maxsize=4)
def _forcefield(files: tuple[str, ...]) -> Any:
    """An ``openmm.app.ForceField`` per file set, parsed once per process (amber14-all takes ~1 s)."""
    from openmm import app

    return app.ForceField(*files)


def builtin_molecule_system(name: str, solvent: str = "vacuum") -> tuple[Any, Any, np.ndarray]:
    """``(topology, system, positions (N, 3) nm)`` of a built-in molecule.

    Raises:
        FlowforceError: an unknown solvent (listing the valid ones).
    """
    from openmm import app, unit

    from ..data import alanine_dipeptide_pdb

    builtins = {"alanine-dipeptide": alanine_dipeptide_pdb}
    if name not in builtins:
        raise FlowforceError(f"unknown built-in molecule {name!r}; valid: {', '.join(builtins)}")
    if solvent not in BUILTIN_SOLVENTS:
        raise FlowforceError(f"unknown solvent {solvent!r} for target {name!r}; valid: {', '.join(BUILTIN_SOLVENTS)}")
    pdb = app.PDBFile(builtins[name]())
    forcefield = _forcefield((*BUILTIN_FORCEFIELD, *BUILTIN_SOLVENTS[solvent]))
    system = forcefield.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None)
    positions = np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64)
    return pdb.topology, system, positions


class MoleculeTarget:
    """Reduced energy of one molecule on flat coordinates: ``u = energy(x)``, x ``(B, 3N)`` nm.

    Args:
        topology: ``openmm.app.Topology`` of the molecule (its bonds define the internal
            coordinates of a flow built for this target).
        system: the ``openmm.System`` (no periodic box).
        positions: ``(N, 3)`` nm, a reference structure (never used as training data).
        temperature: K.
        energy_cut, energy_max: regularisation in kT (module docstring).
        platform, n_workers, platform_properties: passed to :class:`OpenMMEnergy`.

    Attributes:
        dim: 3N. n_atoms: N. kT: kJ/mol. openmm_energy: the underlying :class:`OpenMMEnergy`.
    """

    def __init__(self, topology: Any, system: Any, positions: np.ndarray, temperature: float = 300.0,
                 energy_cut: float = DEFAULT_ENERGY_CUT, energy_max: float = DEFAULT_ENERGY_MAX,
                 platform: str = "Reference", n_workers: int = 0,
                 platform_properties: dict[str, str] | None = None):
        if system.usesPeriodicBoundaryConditions():
            raise FlowforceError("MoleculeTarget takes a non-periodic System (vacuum or implicit solvent)")
        if not (math.isfinite(energy_cut) and math.isfinite(energy_max) and energy_cut < energy_max):
            raise FlowforceError(f"energy_cut ({energy_cut}) must be finite and below energy_max ({energy_max})")
        self.topology, self.system = topology, system
        self.positions = np.asarray(positions, dtype=np.float64)
        self.n_atoms = int(system.getNumParticles())
        if self.positions.shape != (self.n_atoms, 3):
            raise FlowforceError(f"positions must be ({self.n_atoms}, 3) nm for this System, got {self.positions.shape}")
        self.dim = 3 * self.n_atoms
        self.temperature = float(temperature)
        self.kT = thermal_energy(self.temperature)
        self.energy_cut, self.energy_max = float(energy_cut), float(energy_max)
        self.openmm_energy = OpenMMEnergy(system, self.temperature, platform=platform, n_workers=n_workers,
                                          platform_properties=platform_properties)

    def energy(self, x: Tensor) -> Tensor:
        """Regularised u(x) ``(B,)`` in kT for flat positions ``x`` ``(B, 3N)`` nm;
        differentiable (OpenMM's forces)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise FlowforceError(f"expected flat positions (B, {self.dim}) nm, got {tuple(x.shape)}")
        u = self.openmm_energy(x.reshape(x.shape[0], self.n_atoms, 3))
        return lin_log_cut(u, self.energy_cut, self.energy_max)

    def __call__(self, x: Tensor) -> Tensor:
        return self.energy(x)

    def close(self) -> None:
        self.openmm_energy.close()


def builtin_molecule_target(name: str, solvent: str):
    """A target factory for a built-in molecule in one solvent (keyword arguments of
    :class:`MoleculeTarget` but topology/system/positions)."""

    def factory(temperature: float = 300.0, energy_cut: float = DEFAULT_ENERGY_CUT,
                energy_max: float = DEFAULT_ENERGY_MAX, platform: str | None = None, n_workers: int = 0) -> MoleculeTarget:
        topology, system, positions = builtin_molecule_system(name, solvent)
        platform = platform or DEFAULT_PLATFORMS[solvent]
        # One thread per Context: a batch is many tiny evaluations (and workers must not compete).
        properties = {"Threads": "1"} if platform == "CPU" else None
        return MoleculeTarget(topology, system, positions, temperature=temperature, energy_cut=energy_cut,
                              energy_max=energy_max, platform=platform, n_workers=n_workers,
                              platform_properties=properties)

    factory.__doc__ = f"``MoleculeTarget`` of the built-in {name} ({solvent}, amber14-all, no cutoff)."
    return factory
