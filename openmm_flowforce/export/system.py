"""Systems with a learned force: :func:`create_system`, and saving them without crashing.

Why :func:`save_system` / :func:`load_system` exist: ``XmlSerializer.serialize`` of a System
that holds a TorchForce works, but *deserialising* that XML crashes the process (segfault)
with openmm-torch 1.10 and this torch. So a System is saved **without** its learned
force(s), with an XML comment recording what was removed, and :func:`load_system` adds the
force back from the model file. The saved XML is an ordinary System that
``openmm.XmlSerializer.deserialize`` reads safely (without the learned force).
"""
from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from ..io import atomic_write_bytes, bad_file, require_input_file
from ..safety import check_xml, deserialize_xml
from .backends import LEARNED_FORCE_NAME, make_force, resolve_potential
from .subset import check_particles
from ..errors import FlowforceError

__all__ = ["NOTE_TAG", "create_system", "load_system", "save_system"]

#: Prefix of the XML comment in which :func:`save_system` records the removed forces.
NOTE_TAG = "openmm_flowforce:"
_NOTE = re.compile(r"<!--\s*" + re.escape(NOTE_TAG) + r"\s*(\{.*?\})\s*-->", re.DOTALL)
# Force types whose deserialisation is known to crash, or that cannot be deserialised
# without their Python objects.
_UNSAFE_TYPES = ("TorchForce",)


def _check_topology(topology: Any, n_atoms: int, topology_pdb: str) -> list[float]:
    """Masses (amu) of the topology's atoms, after checking them against the model."""
    atoms = list(topology.atoms())
    if len(atoms) != n_atoms:
        raise FlowforceError(f"the topology has {len(atoms)} atoms but the model was trained on {n_atoms}; "
                             "pass the topology of the molecule the model describes (same atoms, same order)")
    masses = []
    for atom in atoms:
        if atom.element is None:
            raise FlowforceError(f"atom {atom.index} ({atom.residue.name}{atom.residue.index + 1}:{atom.name}) has no "
                                 "element, so its mass is unknown; fix the topology (e.g. the PDB element column)")
        masses.append(atom.element.mass)
    if topology_pdb:
        from ..data.dataset import topology_from_pdb_text

        model_atoms = list(topology_from_pdb_text(topology_pdb).atoms())
        for mine, theirs in zip(atoms, model_atoms):
            if mine.element is not None and theirs.element is not None and mine.element != theirs.element:
                raise FlowforceError(f"atom {mine.index} is {mine.element.symbol} ({mine.residue.name}:{mine.name}) "
                                     f"in the topology but {theirs.element.symbol} ({theirs.residue.name}:"
                                     f"{theirs.name}) in the model: the atoms must be in the model's order")
    return masses


def check_model_atoms(topology: Any, particles: list[int], source: Any) -> None:
    """Check that the topology's atoms at ``particles`` are the model's atoms, in its order.

    Args:
        topology: ``openmm.app.Topology`` of the whole System.
        particles: indices of the model's atoms in ``topology``, in the model's order.
        source: the :class:`~.backends.PotentialSource`.

    Raises:
        FlowforceError: a different atom count, or an element that differs from the model's.
    """
    atoms = list(topology.atoms())
    if len(particles) != source.n_atoms:
        raise FlowforceError(f"the potential is asked to act on {len(particles)} atoms but the model describes "
                             f"{source.n_atoms}; select exactly the model's atoms, in the model's order")
    bad = [p for p in particles if not 0 <= p < len(atoms)]
    if bad:
        raise FlowforceError(f"atom indices {bad} are not in the topology ({len(atoms)} atoms)")
    if source.masses is not None or not source.topology_pdb:
        return  # CG beads: no elements to compare
    from ..data.dataset import topology_from_pdb_text

    for k, (index, theirs) in enumerate(zip(particles, topology_from_pdb_text(source.topology_pdb).atoms())):
        mine = atoms[index]
        if mine.element is not None and theirs.element is not None and mine.element != theirs.element:
            raise FlowforceError(f"atom {index} ({mine.residue.name}{mine.residue.index + 1}:{mine.name}) is "
                                 f"{mine.element.symbol} but model atom {k} ({theirs.residue.name}:{theirs.name}) is "
                                 f"{theirs.element.symbol}: the atoms must be the model's, in the model's order")


def create_system(topology: Any, model: Any, backend: str = "auto", temperature: Any = None,
                  cuda_graphs: bool = False) -> Any:
    """A System of the molecule with the learned force as its only force.

    Args:
        topology: ``openmm.app.Topology`` of the molecule, atoms in the model's order.
        model: ``BoltzmannGenerator``, checkpoint path, exported ``.pt`` path, or compiled
            ``.pt2`` package path.
        backend: ``auto``, ``torchforce``, ``pythonforce`` or ``native`` (see :func:`make_force`).
        temperature: K or an ``openmm.unit`` Quantity (see :func:`make_force`).
        cuda_graphs: TorchForce CUDA graphs (CUDA platform only).

    Returns:
        ``openmm.System``: masses from the elements (amu) or, when the exported file stores
        them (CG models), the stored masses; no constraints, no box, and the learned force.

    Raises:
        ValueError: atom count or element order differs from the model's, an atom has no
            element, or a bad backend/temperature.
    """
    import openmm

    source = resolve_potential(model, temperature)
    if source.masses is not None:  # stored in the file (CG beads may have no element)
        n_topology = topology.getNumAtoms()
        if n_topology != source.n_atoms or len(source.masses) != source.n_atoms:
            raise FlowforceError(f"the topology has {n_topology} particles but the model has {source.n_atoms} "
                                 "(beads); pass the topology the model was trained on (e.g. the CG.pdb of "
                                 "flowforce cg)")
        masses = list(source.masses)
    else:
        masses = _check_topology(topology, source.n_atoms, source.topology_pdb)
    system = openmm.System()
    for mass in masses:
        system.addParticle(mass)
    system.addForce(make_force(source, backend=backend, cuda_graphs=cuda_graphs))
    return system


def save_system(system: Any, xml_path: str | os.PathLike) -> Path:
    """Write ``system`` as XML *without* its learned force(s), atomically.

    Forces named :data:`~.backends.LEARNED_FORCE_NAME` (every force from ``make_force``)
    are left out, because deserialising a TorchForce crashes the process with
    openmm-torch 1.10; an XML comment records their type and force group. Restore the
    System with :func:`load_system`. Other forces are kept as they are.

    Raises:
        ValueError: the System has no learned force (use ``XmlSerializer`` directly).
    """
    import openmm

    forces = system.getForces()
    learned = [i for i, force in enumerate(forces) if force.getName() == LEARNED_FORCE_NAME]
    if not learned:
        raise FlowforceError(f"the System has no force named {LEARNED_FORCE_NAME!r} (from make_force); "
                             "save it with openmm.XmlSerializer.serialize")
    root = ET.fromstring(openmm.XmlSerializer.serialize(system))
    container = root.find("Forces")
    assert container is not None and len(container) == len(forces)
    elements = list(container)
    from .subset import learned_force_particles

    note = {"removed_forces": [{"type": elements[i].get("type"), "force_group": forces[i].getForceGroup(),
                                "particles": learned_force_particles(forces[i])} for i in learned],
            "restore": "openmm_flowforce.openmm.load_system(xml_path, model_path)"}
    for i in learned:
        container.remove(elements[i])
    # A comment inside <System>: one before it would hide the root from XmlSerializer.deserialize.
    comment = ET.Comment(f" {NOTE_TAG} {json.dumps(note)} ")
    comment.tail = "\n\t"
    root.insert(0, comment)
    text = '<?xml version="1.0" ?>\n' + ET.tostring(root, encoding="unicode") + "\n"
    out = Path(xml_path)
    atomic_write_bytes(out, text.encode())
    return out


def load_system(xml_path: str | os.PathLike, model_path: Any, backend: str = "auto",
                temperature: Any = None, cuda_graphs: bool = False, trust: bool | None = None) -> Any:
    """Read a System written by :func:`save_system` and add the learned force back.

    Args:
        xml_path: the XML file.
        model_path: the model (exported ``.pt``, compiled ``.pt2``, checkpoint, or
            ``BoltzmannGenerator``).
        backend, temperature, cuda_graphs: as for :func:`make_force`.
        trust: read a System that could run code (a ``PythonForce``); see
            :mod:`openmm_flowforce.safety`. **Dangerous**: only for files you made.

    Returns:
        The ``openmm.System`` with the learned force in the force group it was saved with.

    Raises:
        UnsafeFileError: the XML holds a ``PythonForce`` or another element that could run
            code when deserialised (refused before deserialising), unless ``trust``.
        FlowforceError: the XML holds a TorchForce (deserialising it would crash this process;
            it was not written by :func:`save_system`), its particle count differs from the
            model's atom count, or the file is missing, empty or not a System.
    """
    path = require_input_file(xml_path, "an OpenMM System XML file",
                              "write it with openmm_flowforce.openmm.save_system")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise bad_file(path, "an OpenMM System XML file", error, "write it with save_system") from None
    check_xml(text, str(path), trust)
    unsafe = [t for t in _UNSAFE_TYPES if re.search(rf'<Force\b[^>]*type="{t}"', text)]
    if unsafe:
        raise FlowforceError(f"{xml_path} contains a {unsafe[0]}; deserialising it crashes openmm-torch 1.10, so it is "
                             "not loaded. Save Systems with openmm_flowforce.openmm.save_system, which leaves the "
                             "learned force out")
    match = _NOTE.search(text)
    try:
        removed = json.loads(match.group(1))["removed_forces"] if match else [{"force_group": 0}]
        groups = [(int(f["force_group"]), None if f.get("particles") is None else [int(p) for p in f["particles"]])
                  for f in removed]
    except (ValueError, KeyError, TypeError) as error:
        raise bad_file(path, "a System written by save_system", f"its {NOTE_TAG} comment is damaged: {error}",
                       "write it again with save_system") from None
    system = deserialize_xml(text, str(path), trust=True, expected="System")  # checked above
    source = resolve_potential(model_path, temperature)
    for group, particles in groups:
        if particles is None and system.getNumParticles() != source.n_atoms:
            raise FlowforceError(f"{xml_path} has {system.getNumParticles()} particles but the model has "
                                 f"{source.n_atoms} atoms")
        if particles is not None:
            check_particles(particles, source.n_atoms, system.getNumParticles())
        force = make_force(source, backend=backend, cuda_graphs=cuda_graphs, particles=particles)
        force.setForceGroup(int(group))
        system.addForce(force)
    return system
