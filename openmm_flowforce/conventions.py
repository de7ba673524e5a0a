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


#: Quantity kinds accepted by :func:`in_openmm_units` → (OpenMM unit name, what it measures).
OPENMM_UNITS: dict[str, tuple[str, str]] = {
    "temperature": ("kelvin", "a temperature"),
    "time": ("picosecond", "a time"),
    "friction": ("/picosecond", "a rate (1/time)"),
    "length": ("nanometer", "a length"),
    "energy": ("kilojoule_per_mole", "an energy per mole"),
}


def _openmm_unit(kind: str):
    from openmm import unit

    name = OPENMM_UNITS[kind][0]
    return unit.picosecond ** -1 if name == "/picosecond" else getattr(unit, name)


def in_openmm_units(value, kind: str, name: str, scale: float = 1.0):
    """A float (or numpy array) in OpenMM's unit of ``kind``, from a number in those units or
    an ``openmm.unit.Quantity`` of any compatible unit.

    Args:
        value: float, array, or Quantity (e.g. ``300 * kelvin``, ``2 * femtoseconds``,
            positions ``(N, 3)`` as a Quantity of a list of ``Vec3`` or of an array).
        kind: a key of :data:`OPENMM_UNITS` (``temperature`` K, ``time`` ps, ``friction``
            1/ps, ``length`` nm, ``energy`` kJ/mol).
        name: the argument's name, for the message.
        scale: a Quantity's value in OpenMM's unit is multiplied by this, for arguments in
            other units (e.g. 1000 for an argument in fs; plain numbers are returned as given).

    Raises:
        OptionError: a Quantity whose unit is not compatible (e.g. a time for a temperature).
    """
    if not hasattr(value, "value_in_unit"):
        return value
    from .errors import OptionError

    target = _openmm_unit(kind)
    if not value.unit.is_compatible(target):
        raise OptionError(f"{name} must be {OPENMM_UNITS[kind][1]} (a number in {target.get_symbol()} or an "
                          f"openmm.unit Quantity of compatible units), got {value}")
    converted = value.value_in_unit(target)
    if isinstance(converted, (list, tuple)):
        import numpy as np

        converted = np.asarray([[float(c) for c in v] if hasattr(v, "__len__") else float(v) for v in converted])
    return converted * scale if scale != 1.0 else converted


def kT(temperature_kelvin) -> float:
    """Thermal energy k_B·T in kJ/mol for a temperature in K (or an ``openmm.unit`` Quantity).

    Raises:
        ValueError: if the temperature is not a positive finite number.
    """
    t = float(in_openmm_units(temperature_kelvin, "temperature", "temperature"))
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
