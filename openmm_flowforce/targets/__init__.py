"""Energies to train and sample against: the OpenMM bridge and (later) toy targets.

Every target maps positions ``(B, N, 3)`` to reduced energies ``u = E/kT`` of shape
``(B,)``; look one up by name with :func:`get_target`.
"""
from .openmm_energy import OpenMMEnergy
from .registry import get_target, register_target, target_names
from .toys import GaussianMixture40, LennardJonesCluster, MultiDoubleWell

__all__ = ["GaussianMixture40", "LennardJonesCluster", "MultiDoubleWell", "OpenMMEnergy", "get_target",
           "register_target", "target_names"]
