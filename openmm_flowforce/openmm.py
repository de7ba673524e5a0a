"""The public OpenMM entry points: ``from openmm_flowforce.openmm import make_force``.

* :func:`make_force` — an OpenMM Force for U(x) = −kT·log q(x) (kJ/mol, x in nm), backend
  ``auto`` / ``torchforce`` / ``pythonforce`` / ``native``; ``particles=`` makes it act on
  some of a larger System's particles (mixed ML/MM Systems; openmm-ml's
  ``MLPotential("flowforce", ...)`` is built on it, :mod:`openmm_flowforce.openmmml_adapter`);
* :func:`create_system` — a System of the molecule (masses from elements) with that force;
* :func:`save_system` / :func:`load_system` — XML files without the learned force (a
  System holding a TorchForce crashes on deserialisation with openmm-torch 1.10), the force
  re-added from the model file on load; XML that could run code (a ``PythonForce``) is
  refused unless ``trust=True`` (see :mod:`openmm_flowforce.safety`);
* :func:`create_simulation` — a ready ``openmm.app.Simulation`` (Langevin) of the molecule
  under its learned potential; temperatures, time steps, frictions and positions take
  floats in OpenMM's units or ``openmm.unit`` Quantities;
* :func:`export_potential` / :func:`load_exported` — the TorchScript file TorchForce runs;
* :func:`compile_package` / :func:`load_package` / :func:`read_package_metadata` — the
  AOTInductor package (``.pt2``) of the same energy and forces, which the native plugin
  (``backend="native"``) and PythonForce run.
"""
from openmm_flowforce.export.backends import LEARNED_FORCE_NAME, backend_names, make_force
from openmm_flowforce.export.compiled import compile_package, load_package, read_package_metadata
from openmm_flowforce.export.system import create_system, load_system, save_system
from openmm_flowforce.export.torchscript import export_potential, load_exported
from openmm_flowforce.md.simulation import create_simulation

__all__ = ["LEARNED_FORCE_NAME", "backend_names", "compile_package", "create_simulation", "create_system",
           "export_potential",
           "load_exported", "load_package", "load_system", "make_force", "read_package_metadata", "save_system"]
