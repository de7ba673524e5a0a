"""OpenMM glue: Systems from input files (``systems``), reference MD (``reference``),
MD with learned potentials (``simulate``) and the installation check (``doctor``).

Kept light on purpose: submodules import openmm and torch themselves, so importing
``openmm_flowforce.md`` costs nothing.
"""
