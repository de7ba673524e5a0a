"""openmm-ml entry point: ``MLPotential("flowforce", modelFile="model.pt")``.

Registered in ``setup.py`` under the ``openmmml.potentials`` entry-point group, which
openmm-ml loads (and instantiates the factory of) while ``openmmml`` itself is being
imported. So this module imports nothing beyond the standard library at import time and
subclasses nothing from openmm-ml: a missing or broken dependency surfaces when the
potential is *created*, as an error naming it, never as a failed ``import openmmml``.

openmm-ml's protocol (``openmmml/mlpotential.py``): the factory's ``createImpl(name,
**args)`` gets the keyword arguments given to ``MLPotential``; the impl's ``addForces(
topology, system, atoms, forceGroup, **args)`` adds the learned force to a System,
``atoms`` being the indices the potential acts on (None: all of them). Mixed ML/MM Systems
use openmm-ml's generic embeddings (``mechanical``), which call ``addForces`` with the
ML subset; the learned force then acts on those particles only
(:mod:`openmm_flowforce.export.subset`).

Example:
    >>> from openmmml import MLPotential                                   # doctest: +SKIP
    >>> potential = MLPotential("flowforce", modelFile="ala.pt")           # doctest: +SKIP
    >>> system = potential.createSystem(topology)                           # doctest: +SKIP
    >>> mixed = potential.createMixedSystem(topology, mm_system, atoms)     # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any, Iterable

__all__ = ["FlowForcePotentialImpl", "FlowForcePotentialImplFactory"]

#: Keyword arguments of ``MLPotential("flowforce", ...)``.
POTENTIAL_ARGS = ("modelFile", "backend", "temperature", "cudaGraphs")
#: Keyword arguments openmm-ml's embeddings forward to ``addForces`` that concern them, not us.
EMBEDDING_ARGS = ("mlLongRange", "linkAtomDistances")


class FlowForcePotentialImplFactory:
    """Creates :class:`FlowForcePotentialImpl` objects (openmm-ml's ``MLPotentialImplFactory``)."""

    def createImpl(self, name: str, **args: Any) -> "FlowForcePotentialImpl":  # noqa: N802 - openmm-ml protocol
        return FlowForcePotentialImpl(name, **args)


class FlowForcePotentialImpl:
    """A flow potential (U = −kT·log q, kJ/mol) as an openmm-ml ``MLPotentialImpl``.

    Args:
        name: the name the potential was requested under (``flowforce``).
        modelFile: exported TorchScript ``.pt``, compiled package ``.pt2``, or trainer
            checkpoint (``.ckpt``); a ``BoltzmannGenerator`` object also works.
        backend: ``auto``, ``torchforce``, ``pythonforce`` or ``native``
            (:func:`openmm_flowforce.openmm.make_force`).
        temperature: K or an ``openmm.unit`` temperature; only for checkpoints (exported
            files store theirs).
        cudaGraphs: TorchForce CUDA graphs (CUDA platform only).

    Raises:
        OptionError: no ``modelFile``, or an unknown keyword (the valid ones are listed).
    """

    def __init__(self, name: str, modelFile: Any = None, backend: str = "auto",  # noqa: N803 - openmm-ml style
                 temperature: Any = None, cudaGraphs: bool = False, **unknown: Any):
        from .errors import OptionError

        if unknown:
            raise OptionError(f"MLPotential({name!r}) got unknown arguments {sorted(unknown)}; valid: "
                              f"{', '.join(POTENTIAL_ARGS)}")
        if modelFile is None:
            raise OptionError(f"MLPotential({name!r}) needs modelFile=: the exported .pt, the compiled .pt2 or the "
                              "trainer checkpoint of a flowforce model")
        from .export.backends import resolve_backend, resolve_potential

        if backend != "auto":
            resolve_backend(backend)  # a bad name fails here, not at createSystem
        self.name = name
        self.source = resolve_potential(modelFile, temperature)
        self.backend = backend
        self.cuda_graphs = bool(cudaGraphs)

    def addForces(self, topology: Any, system: Any, atoms: Iterable[int] | None, forceGroup: int,  # noqa: N802
                  **args: Any) -> None:
        """Add the learned force acting on ``atoms`` (None: every atom) to ``system``.

        Where the model file stores masses (CG models: bead masses), the particles get
        them: openmm-ml takes masses from elements, 0 for element-less atoms, neither of
        which is a bead's mass.

        Raises:
            FlowforceError: the atoms do not match the model (count, elements, order).
            OptionError: unknown keyword arguments.
        """
        from .errors import FlowforceError, OptionError
        from .export.backends import make_force
        from .export.system import check_model_atoms

        unknown = sorted(set(args) - set(EMBEDDING_ARGS))
        if unknown:
            raise OptionError(f"the flowforce potential got unknown arguments {unknown}")
        particles = list(range(topology.getNumAtoms())) if atoms is None else [int(a) for a in atoms]
        caps = [p for p in particles if p < system.getNumParticles() and system.isVirtualSite(p)]
        if caps:
            # openmm-ml's embeddings cap every bond the ML subset cuts with a link atom (a
            # virtual site); a flow describes whole molecules and has no such atoms.
            raise FlowforceError(f"the selected atoms cut {len(caps)} bond(s) of a molecule (openmm-ml added link "
                                 "atoms to cap them); a flowforce potential describes whole molecules: select "
                                 "every atom of the molecule the model was trained on")
        check_model_atoms(topology, particles, self.source)
        if self.source.masses is not None and system.getNumParticles() > 0:
            # CG models store their bead masses; openmm-ml took masses from elements (0 where
            # there is none), which for a bead is not its mass.
            for index, mass in zip(particles, self.source.masses):
                system.setParticleMass(index, mass)
        force = make_force(self.source, backend=self._copyable_backend(system), cuda_graphs=self.cuda_graphs,
                           particles=None if particles == list(range(system.getNumParticles())) else particles)
        force.setForceGroup(int(forceGroup))
        system.addForce(force)

    def _copyable_backend(self, system: Any) -> str:
        """The backend to use; for openmm-ml's interpolation (``interpolate=True``), not TorchForce.

        openmm-ml's interpolation adds the ML forces to an empty scratch System and then
        deep-copies them into a ``CustomCVForce``. Copying an OpenMM force goes through its
        XML, and deserialising a TorchForce crashes the process with openmm-torch 1.10 (see
        :mod:`openmm_flowforce.export.system`), so there ``auto`` picks another backend and
        an explicit ``torchforce`` is refused.
        """
        from .errors import OptionError
        from .export.backends import resolve_backend

        if system.getNumParticles() > 0 or resolve_backend(self.backend, self.source).name != "torchforce":
            return self.backend
        if self.backend == "torchforce":
            raise OptionError("backend='torchforce' cannot be used with interpolate=True: openmm-ml copies the force, "
                              "and copying a TorchForce crashes openmm-torch 1.10; use backend='auto', "
                              "'pythonforce' or 'native'")
        return "pythonforce"

    def getSupportedEmbeddings(self) -> list[str]:  # noqa: N802 - openmm-ml protocol
        """No potential-specific embeddings: openmm-ml's generic ones apply."""
        return []

    def getMLLongRange(self) -> bool:  # noqa: N802 - openmm-ml protocol
        """False: a flow potential is an intramolecular energy of its atoms (no periodic images)."""
        return False
