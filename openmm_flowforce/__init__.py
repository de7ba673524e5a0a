"""openmm_flowforce: learned molecular potentials from normalizing flows, run in OpenMM.

Importing the package is deliberately cheap: it pulls in neither torch nor openmm.
Import the subpackages you need (``openmm_flowforce.flows``, ``openmm_flowforce.md``, ...).
"""
from openmm_flowforce._version import __version__

__all__ = ["__version__"]
