"""OpenMM glue: installation checks (``doctor``), and later make_force, create_system, simulate.

Kept light on purpose: submodules import openmm and torch themselves, so importing
``openmm_flowforce.md`` costs nothing.
"""
