"""Frames of a protein as the evaluation needs them: Cα positions, and which replica each
frame belongs to, from every file the package writes.

:func:`load_protein_frames` reads

* a dataset ``.npz`` (``flowforce md``, all-atom, or a CG-mapped dataset; :mod:`..data.dataset`),
* a samples ``.npz`` (``flowforce sample``: ``positions`` ``(n, N, 3)`` or ``(n, 3N)`` nm and
  ``topology_pdb``),
* trajectory files mdtraj reads (``flowforce simulate`` writes a DCD) with a topology
  (the CG PDB ``flowforce cg`` writes, or an all-atom one),

and keeps the atoms (or beads) named ``CA``: all-atom frames are mapped to Cα with the ``ca``
preset's rule (the bead is the Cα atom, :mod:`..coordinates.cg_mapping`), and CG topologies made
with the ``ca`` or ``backbone`` mapping keep their Cα beads. A ``replica`` array (one integer
per frame) is taken from the dataset or the ``.npz`` when there is one, so independent runs
are never treated as one trajectory; without it the frames are one trajectory in time order.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import BadFileError, FlowforceError
from ..io import bad_file, require_input_file
from .protein import ca_indices, heavy_atom_indices, residues_of

__all__ = ["ProteinFrames", "load_folded_structure", "load_protein_frames"]

NPZ_HINT = "a flowforce dataset or samples .npz"


@dataclass
class ProteinFrames:
    """Cα frames of one ensemble.

    Attributes:
        ca: ``(T, n_res, 3)`` nm.
        residues: ``(n_res,)`` residue index of each Cα (sequence order).
        sequence: residue name of each Cα (protonation variants as the plain amino acid).
        replica: ``(T,)`` int replica ids, or None (one trajectory).
        frame_ps: time between frames in ps, or None when the file does not say.
        source: the file(s) read.
        all_atom: ``(T, N, 3)`` nm all positions and ``topology`` when the frames are all-atom
            (more atoms than Cα), for the heavy-atom Q; None for CG frames.
    """

    ca: np.ndarray
    residues: np.ndarray
    sequence: tuple[str, ...]
    replica: np.ndarray | None
    frame_ps: float | None
    source: str
    all_atom: np.ndarray | None = None
    topology: Any = None

    @property
    def n_frames(self) -> int:
        return int(len(self.ca))


#: Residue names that are one amino acid in another protonation or bonding state.
RESIDUE_ALIASES = {"HID": "HIS", "HIE": "HIS", "HIP": "HIS", "HSD": "HIS", "HSE": "HIS", "HSP": "HIS",
                   "CYX": "CYS", "CYM": "CYS", "ASH": "ASP", "GLH": "GLU", "LYN": "LYS"}


def _from_topology(topology: Any, positions: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    ca = ca_indices(topology)
    if len(ca) < 4:
        raise FlowforceError(f"{source} has {len(ca)} atoms or beads named CA; protein evaluation compares Cα "
                             "positions: give all-atom frames, or CG frames made with --mapping ca or backbone")
    atoms = list(topology.atoms())
    names = tuple(RESIDUE_ALIASES.get(atoms[i].residue.name, atoms[i].residue.name) for i in ca)
    return positions[:, ca], residues_of(topology, ca), names


def _replica_from(arrays: dict[str, np.ndarray] | None, dataset: Any, n_frames: int, where: str) -> np.ndarray | None:
    replica = getattr(dataset, "replica", None)
    if replica is None and arrays is not None and "replica" in arrays:
        replica = arrays["replica"]
    if replica is None:
        return None
    replica = np.asarray(replica)
    if replica.shape != (n_frames,) or not np.issubdtype(replica.dtype, np.integer):
        raise BadFileError(f"{where}: the replica array must hold one integer per frame, shape ({n_frames},), got "
                           f"{replica.dtype} {replica.shape}")
    return replica


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except Exception as error:  # numpy, zipfile and zlib raise many types for bad archives
        raise bad_file(path, NPZ_HINT, error, "write it with flowforce md, flowforce sample or save_dataset") from None


def _samples(path: Path, arrays: dict[str, np.ndarray]) -> tuple[Any, np.ndarray]:
    from ..data.dataset import topology_from_pdb_text

    if "positions" not in arrays or "topology_pdb" not in arrays:
        raise BadFileError(f"{path} is neither a flowforce dataset nor a samples file: it holds "
                           f"{', '.join(sorted(arrays)) or 'no arrays'}, but needs positions and topology_pdb")
    try:
        topology = topology_from_pdb_text(str(arrays["topology_pdb"].item()))
    except Exception as error:  # PDBFile raises several types on malformed text
        raise BadFileError(f"{path}: topology_pdb is not valid PDB text ({type(error).__name__})") from None
    x = np.asarray(arrays["positions"], dtype=np.float64)
    n_atoms = topology.getNumAtoms()
    if x.ndim == 2 and x.shape[1] == 3 * n_atoms:
        x = x.reshape(len(x), n_atoms, 3)
    if x.ndim != 3 or x.shape[1:] != (n_atoms, 3) or len(x) == 0:
        raise BadFileError(f"{path}: positions of shape {x.shape} do not fit the {n_atoms} atoms of its topology_pdb")
    if not np.isfinite(x).all():
        raise BadFileError(f"{path}: positions contain NaN or inf; drop those samples")
    return topology, x


def load_protein_frames(paths: str | os.PathLike | Sequence[str | os.PathLike], topology: str | os.PathLike | None = None,
                        stride: int = 1, skip: int = 0) -> ProteinFrames:
    """Cα frames of a dataset / samples ``.npz`` or of trajectory files with a topology (module docstring).

    Args:
        paths: one ``.npz``, or one or more trajectory files (concatenated in order).
        topology: the topology of trajectory files (must be None for a ``.npz``).
        stride: keep every ``stride``-th frame; skip: then drop the first ``skip`` frames.

    Raises:
        MissingFileError, BadFileError, FlowforceError: one line naming the file and the fix.
    """
    from ..data.trajectory import load_data

    files = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    name = " ".join(str(p) for p in files)
    arrays = None
    if len(files) == 1 and files[0].suffix.lower() == ".npz":
        if topology is not None:
            raise FlowforceError(f"{files[0]} is a .npz, which carries its own topology; drop the topology option")
        path = require_input_file(files[0], NPZ_HINT)
        arrays = _read_npz(path)
        dataset = None
        if "energies" in arrays or "temperature" in arrays:
            dataset = load_data(path)
            top, x = dataset.topology, np.asarray(dataset.positions, dtype=np.float64)
        else:
            top, x = _samples(path, arrays)
    else:
        if topology is None:
            raise FlowforceError(f"{name}: trajectory files need a topology (the PDB written with them, e.g. the CG.pdb "
                                 "of flowforce cg)")
        from ..io import silenced_native_stdout

        with silenced_native_stdout():  # mdtraj's DCD plugin prints to fd 1
            dataset = load_data(files[0] if len(files) == 1 else files, topology=topology)
        top, x = dataset.topology, np.asarray(dataset.positions, dtype=np.float64)
    replica = _replica_from(arrays, dataset, len(x), name)
    frame_ps = getattr(dataset, "save_every_ps", None) if dataset is not None else None
    keep = np.arange(0, len(x), int(stride))[int(skip):]
    if len(keep) == 0:
        raise FlowforceError(f"{name}: stride {stride} and skip {skip} leave none of its {len(x)} frames")
    x = x[keep]
    ca, residues, sequence = _from_topology(top, x, name)
    all_atom = x if x.shape[1] > len(residues) else None
    return ProteinFrames(ca=ca, residues=residues, sequence=sequence, replica=None if replica is None else replica[keep],
                         frame_ps=None if frame_ps is None else float(frame_ps) * int(stride), source=name,
                         all_atom=all_atom, topology=top if all_atom is not None else None)


def load_folded_structure(path: str | os.PathLike) -> ProteinFrames:
    """The folded reference structure (a PDB, all-atom or CG with Cα beads) as one frame."""
    import mdtraj

    from ..io import silenced_native_stdout

    path = require_input_file(path, "a PDB of the folded structure")
    try:
        with silenced_native_stdout():
            structure = mdtraj.load(str(path))
    except Exception as error:  # mdtraj raises several types for foreign files
        raise bad_file(path, "a PDB of the folded structure", error, "give the folded protein as a PDB file") from None
    top = structure.topology.to_openmm()
    x = np.asarray(structure.xyz[:1], dtype=np.float64)  # mdtraj: nm
    ca, residues, sequence = _from_topology(top, x, str(path))
    all_atom = x if x.shape[1] > len(residues) else None
    return ProteinFrames(ca=ca, residues=residues, sequence=sequence, replica=None, frame_ps=None, source=str(path), all_atom=all_atom,
                         topology=top if all_atom is not None else None)


def _atom_keys(topology: Any) -> list[tuple[int, str]]:
    """(residue ordinal, atom name) of every atom: how two files of one molecule name an atom."""
    return [(atom.residue.index, atom.name) for atom in topology.atoms()]


def heavy_atoms(frames: ProteinFrames, like: ProteinFrames | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Heavy-atom positions ``(T, n_heavy, 3)`` nm and their residue indices.

    With ``like``, the heavy atoms of ``like`` in its order, found in ``frames`` by residue
    ordinal and atom name (two files of one protein need not list atoms in the same order).

    Returns:
        None for CG frames, or when an atom of ``like`` has no namesake in ``frames`` (other
        naming, other protonation of a heavy atom's residue, missing caps).
    """
    if frames.all_atom is None or (like is not None and like.all_atom is None):
        return None
    if like is None:
        heavy = heavy_atom_indices(frames.topology)
        return frames.all_atom[:, heavy], residues_of(frames.topology, heavy)
    wanted = heavy_atom_indices(like.topology)
    keys = _atom_keys(like.topology)
    where = {key: i for i, key in enumerate(_atom_keys(frames.topology))}
    if any(keys[i] not in where for i in wanted):
        return None
    found = np.asarray([where[keys[i]] for i in wanted], dtype=np.int64)
    return frames.all_atom[:, found], residues_of(like.topology, wanted)
