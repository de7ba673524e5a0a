"""Energies to train and sample against: the OpenMM bridge and the toy targets.

Every target maps a batch of configurations to reduced energies ``u = E/kT`` of shape
``(B,)``: :class:`OpenMMEnergy` takes positions ``(B, N, 3)`` in nm; the toy targets
(``gmm40``, ``dw4``, ``lj13``, ``lj55``, at kT = 1) take flat ``(B, dim)`` tensors. Look one
up by name with :func:`get_target`.
"""
from .openmm_energy import OpenMMEnergy
from .registry import get_target, register_target, target_names
from .toys import GaussianMixture40, LennardJonesCluster, MultiDoubleWell

__all__ = ["GaussianMixture40", "LennardJonesCluster", "MultiDoubleWell", "OpenMMEnergy", "get_target",
           "register_target", "target_names"]
