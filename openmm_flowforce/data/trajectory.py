"""Reference data as users have it: trajectories that mdtraj reads, read into a :class:`Dataset`.

:func:`load_data` is the one call the commands make: a ``.npz`` dataset (the fast path,
:func:`~openmm_flowforce.data.dataset.load_dataset`) or one or more trajectory files (DCD,
XTC, TRR, H5, NetCDF, ... whatever ``mdtraj.load`` reads) with a topology (PDB, prmtop,
psf, gro, ...), optional forces from a separate array file, a stride and an atom
selection. Both return the same :class:`Dataset` (positions float32 nm, forces float32
kJ/mol/nm), so training code never knows where the frames came from.

Trajectory files carry no energies: the dataset's ``energies`` are zeros and its
``source`` says so (nothing in training reads them). The temperature is the caller's
(default 300 K).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..conventions import in_openmm_units
from ..errors import BadFileError, FlowforceError, OptionError
from ..io import require_input_file
from .dataset import Dataset, _validate, load_dataset

__all__ = ["DEFAULT_TEMPERATURE", "TRAJECTORY_HINT", "load_data", "load_trajectory_dataset"]

#: K, when a trajectory is read without a temperature.
DEFAULT_TEMPERATURE = 300.0
TRAJECTORY_HINT = "a trajectory mdtraj reads (DCD, XTC, TRR, H5, NetCDF, ...)"


def _is_npz(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".npz"


def load_data(data: str | os.PathLike | Sequence[str | os.PathLike], topology: str | os.PathLike | None = None,
              forces: str | os.PathLike | None = None, stride: int = 1, selection: str | None = None,
              temperature: Any = None, trust: bool | None = None) -> Dataset:
    """A :class:`Dataset` from a ``.npz`` dataset or from trajectory files with a topology.

    Args:
        data: one or more ``.npz`` files (written by ``flowforce md`` / ``flowforce
            convert``; several are joined by :func:`~openmm_flowforce.data.join.join_datasets`,
            replicas kept apart), or one or more trajectory files (concatenated in the order given).
        topology: topology file for trajectories (PDB, prmtop, psf, gro, H5...); must be
            None for a ``.npz``, which carries its own.
        forces: for trajectories, an array file of forces in kJ/mol/nm: ``.npy`` of shape
            ``(T, N, 3)`` for all T frames and N atoms of the files (before ``stride`` and
            ``selection``), or a ``.npz`` holding one such array (or one named ``forces``).
        stride: keep every ``stride``-th frame (trajectories only).
        selection: mdtraj atom selection (e.g. ``"protein"``, ``"not water"``); trajectories only.
        temperature: K or an ``openmm.unit`` Quantity (trajectories; default 300 K).
        trust: as :func:`~openmm_flowforce.data.dataset.load_dataset`.

    Raises:
        OptionError: trajectory options given with a ``.npz``, ``.npz`` and trajectory files
            mixed, or a trajectory without ``topology``.
        MissingFileError, BadFileError, FlowforceError: unreadable or mismatched files
            (several ``.npz`` of different molecules, Systems or temperatures).
    """
    paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not paths:
        raise OptionError("no data files given")
    if any(_is_npz(p) for p in paths):
        if not all(_is_npz(p) for p in paths):
            raise OptionError(f"give .npz datasets or trajectory files, not both: {paths}")
        given = {"--topology": topology, "--forces": forces, "--select": selection, "--temperature": temperature,
                 "--stride": None if stride == 1 else stride}
        extra = [name for name, value in given.items() if value is not None]
        if extra:
            raise OptionError(f"{', '.join(extra)} apply to trajectory files; {paths[0]} is a .npz dataset that "
                              "carries its own topology, forces and temperature")
        if len(paths) == 1:
            return load_dataset(paths[0], trust=trust)
        from .join import join_datasets

        return join_datasets([load_dataset(p, trust=trust) for p in paths], [str(p) for p in paths])
    if topology is None:
        raise OptionError(f"{paths[0]} is read as {TRAJECTORY_HINT}; give its topology with --topology "
                          "(PDB, prmtop, psf, gro), or pass a .npz dataset")
    return load_trajectory_dataset(paths, topology, forces=forces, stride=stride, selection=selection,
                                   temperature=temperature)


def _atom_count(path: str, mdtraj: Any) -> int | None:
    """Atoms per frame in a trajectory file, read without a topology where mdtraj can."""
    try:
        with mdtraj.open(path) as handle:
            frame = handle.read(n_frames=1)
        xyz = frame[0] if isinstance(frame, tuple) else frame
        return int(np.asarray(xyz).shape[1])
    except Exception:  # noqa: BLE001 - only used to improve a message
        return None


def _read_forces(path: str | os.PathLike) -> np.ndarray:
    path = require_input_file(path, "forces as a .npy (T, N, 3) array in kJ/mol/nm")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as error:  # numpy raises many types for foreign files
        raise BadFileError(f"cannot read forces from {path} ({type(error).__name__}: {error}); expected a .npy "
                           "array of shape (frames, atoms, 3) in kJ/mol/nm") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded as npz:
            names = list(npz.files)
            key = "forces" if "forces" in names else names[0] if len(names) == 1 else None
            if key is None:
                raise BadFileError(f"{path} holds several arrays ({', '.join(names)}) and none is named 'forces'")
            loaded = npz[key]
    forces = np.asarray(loaded)
    if forces.ndim != 3 or forces.shape[-1] != 3 or not np.issubdtype(forces.dtype, np.number):
        raise BadFileError(f"{path}: forces must be a numeric array of shape (frames, atoms, 3), got "
                           f"{forces.dtype} {forces.shape}")
    return forces


def load_trajectory_dataset(paths: Sequence[str | os.PathLike], topology: str | os.PathLike,
                            forces: str | os.PathLike | None = None, stride: int = 1, selection: str | None = None,
                            temperature: Any = None) -> Dataset:
    """Read trajectory files with mdtraj into a :class:`Dataset` (see :func:`load_data`).

    Raises:
        FlowforceError: the topology's and a trajectory's atom counts differ, the forces do
            not match the frames, the selection is invalid or empty, or no frames remain.
    """
    import mdtraj

    from ..io import silenced_native_stdout
    from .dataset import topology_to_pdb_text

    stride = int(stride)
    if stride < 1:
        raise OptionError(f"stride must be a positive integer, got {stride}")
    temperature = float(in_openmm_units(DEFAULT_TEMPERATURE if temperature is None else temperature,
                                        "temperature", "temperature"))
    files = [str(require_input_file(p, TRAJECTORY_HINT)) for p in paths]
    top_path = str(require_input_file(topology, "a topology (PDB, prmtop, psf, gro, ...)"))
    try:
        with silenced_native_stdout():
            top = mdtraj.load_topology(top_path)
    except Exception as error:  # mdtraj raises several types for foreign files
        raise BadFileError(f"cannot read the topology {top_path} ({type(error).__name__}: "
                           f"{' '.join(str(error).split())[:200]}); expected PDB, prmtop, psf, gro or H5") from None
    atom_indices = None
    if selection is not None:
        try:
            atom_indices = top.select(selection)
        except Exception as error:  # mdtraj's selection parser raises several types
            raise OptionError(f"invalid atom selection {selection!r} ({' '.join(str(error).split())[:200]})") from None
        if len(atom_indices) == 0:
            raise OptionError(f"the atom selection {selection!r} selects no atoms of {top_path}")
    pieces, frames_per_file = [], []
    for path in files:
        n_file = _atom_count(path, mdtraj)
        if n_file is not None and n_file != top.n_atoms:
            raise FlowforceError(f"{path} has {n_file} atoms per frame but the topology {top_path} has "
                                 f"{top.n_atoms}; they must describe the same atoms")
        try:
            with silenced_native_stdout():  # the DCD plugin prints to fd 1
                full = mdtraj.load(path, top=top)
        except Exception as error:  # mdtraj raises several types for bad or mismatched files
            raise BadFileError(f"cannot read {path} with topology {top_path} ({type(error).__name__}: "
                               f"{' '.join(str(error).split())[:300]}); expected {TRAJECTORY_HINT} of the "
                               "topology's atoms") from None
        frames_per_file.append(full.n_frames)
        pieces.append(full)
    traj = pieces[0].join(pieces[1:]) if len(pieces) > 1 else pieces[0]
    keep = np.arange(0, traj.n_frames, stride)
    atoms = np.arange(top.n_atoms) if atom_indices is None else np.asarray(atom_indices)
    positions = np.asarray(traj.xyz[keep][:, atoms], dtype=np.float32)  # mdtraj: nm
    force_array = None
    if forces is not None:
        all_forces = _read_forces(forces)
        if all_forces.shape != (traj.n_frames, top.n_atoms, 3):
            raise FlowforceError(f"{forces} has forces of shape {all_forces.shape} but the trajectory has "
                                 f"{traj.n_frames} frames of {top.n_atoms} atoms (in {len(files)} file(s)); give "
                                 "forces for every frame and atom, before --stride and --select")
        force_array = np.asarray(all_forces[keep][:, atoms], dtype=np.float32)
    sub = top.subset(atoms) if atom_indices is not None else top
    openmm_topology = sub.to_openmm()
    # Round-trip through PDB text, as every dataset does, so bonds are those a reader of the
    # stored topology_pdb sees.
    from .dataset import topology_from_pdb_text

    text = topology_to_pdb_text(openmm_topology, positions[0].astype(np.float64))
    openmm_topology = topology_from_pdb_text(text)
    energies = np.zeros(len(keep), dtype=np.float64)
    where = ", ".join(files)
    _validate(where, openmm_topology, positions, force_array, energies, temperature)
    source = (f"mdtraj: {where} with topology {top_path}, stride {stride}"
              + (f", selection {selection!r}" if selection else "") + (f", forces from {forces}" if forces else "")
              + "; energies not given (zeros)")
    return Dataset(topology=openmm_topology, positions=positions, forces=force_array, energies=energies,
                   temperature=temperature, source=source)
