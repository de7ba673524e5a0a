"""Exported potentials (TorchScript files, energy+forces graphs, AOTInductor packages) and
the OpenMM force backends that run them.

Submodules import torch and openmm themselves; importing this package costs nothing.
"""
