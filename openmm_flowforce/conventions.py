"""Units, thermal energy, flow direction and domains: the one place they are defined.

Every OpenMM boundary in this package speaks OpenMM's units:

* positions in nm, energies in kJ/mol, forces in kJ/mol/nm, time in ps, temperature in K.

Inside trainers everything is reduced (divided by kT). The conversion between the two
happens only through :func:`kT` and :func:`reduce_energy` / :func:`unreduce_energy`.

Flow direction. ``to_latent(x) -> (z, ladj)`` maps data to latent space analytically and
is what density, energy and forces use; ``to_data(z) -> (x, ladj)`` maps latent to data
and may need root finding. ``ladj`` is always ``log|det dout/din|`` of the map that was
applied, shape ``[batch]``.

Domains. Flows act on the unit cube ``[0, 1]^D``; a periodic dimension is the circle
``[0, 1)`` with 0 and 1 identified. Angles are in ``[0, π]`` and torsions in ``[−π, π)``
before normalisation; :mod:`openmm_flowforce.coordinates` does the normalisation to the
unit cube.
"""
from __future__ import annotations

import math

import torch

from .errors import FlowforceError

#: Molar gas constant in kJ/(mol K) (CODATA 2018, the value OpenMM uses).
MOLAR_GAS_CONSTANT_KJ = 8.314462618e-3

#: Torsions live in [TORSION_LOW, TORSION_LOW + 2π).
TORSION_LOW = -math.pi


def kT(temperature_kelvin: float) -> float:
    """Thermal energy k_B·T in kJ/mol for a temperature in K.

    Raises:
        ValueError: if the temperature is not a positive finite number.
    """
    t = float(temperature_kelvin)
    if not math.isfinite(t) or t <= 0.0:
        raise FlowforceError(f"temperature must be a positive number of kelvin, got {temperature_kelvin!r}")
    return MOLAR_GAS_CONSTANT_KJ * t


def reduce_energy(energy_kj_mol: torch.Tensor | float, temperature_kelvin: float):
    """Energy in kJ/mol → reduced energy u = E / kT (dimensionless)."""
    return energy_kj_mol / kT(temperature_kelvin)


def unreduce_energy(reduced: torch.Tensor | float, temperature_kelvin: float):
    """Reduced energy u → energy in kJ/mol, E = u·kT."""
    return reduced * kT(temperature_kelvin)


def energy_from_log_prob(log_prob: torch.Tensor, temperature_kelvin: float) -> torch.Tensor:
    """U = −kT·log q in kJ/mol for a log density ``log q``."""
    return -kT(temperature_kelvin) * log_prob


def wrap_torsion(angle: torch.Tensor) -> torch.Tensor:
    """Wrap torsions (rad) into [−π, π)."""
    return torch.remainder(angle - TORSION_LOW, 2.0 * math.pi) + TORSION_LOW
