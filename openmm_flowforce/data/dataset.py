"""The reference data file: one ``.npz`` holding an MD trajectory and its molecule.

Schema (every array loads with ``allow_pickle=False``):

===============  ============  ==========  ==================================================
key              shape         dtype       meaning
===============  ============  ==========  ==================================================
format           ()            str         ``"openmm-flowforce/dataset/1"``
positions        (T, N, 3)     float32     positions, nm
forces           (T, N, 3)     float32     forces, kJ/mol/nm (optional)
energies         (T,)          float64     potential energies, kJ/mol
temperature      ()            float64     temperature of the ensemble, K
topology_pdb     ()            str         the molecule as PDB text (topology and bonds)
timestep_fs      ()            float64     integration time step, fs (optional)
save_every_ps    ()            float64     time between frames, ps (optional)
source           ()            str         free text: how the data was made (optional)
system_xml       ()            str         the reference ``openmm.System`` (XmlSerializer), so
                                           samples can be reweighted to it later (optional)
replica          (T,)          int32       index of the MD replica each frame comes from
                                           (optional; ``flowforce md --replicas``)
provenance       ()            str         JSON object: how each replica was run (start kind,
                                           seed, platform, steps, wall time, ns/day) (optional)
cg_mapping       ()            str         JSON of ``CGMapping.to_dict()``: the frames are
                                           already coarse-grained (optional, see below)
===============  ============  ==========  ==================================================

A *CG-mapped* dataset (``flowforce md --save-cg``) stores bead positions and mapped forces
(``F_I = Σ_{i∈G_I} f_i``) instead of atoms, so N is the number of beads, ``topology_pdb``
is the CG topology (:meth:`CGMapping.pdb_text`) and the topology is rebuilt from the mapping
on load; it has no ``system_xml`` (the all-atom System does not describe the beads). The
energies are still the all-atom potential energies. Files without the three new keys are
the files of earlier versions and load as before.

:func:`save_dataset` writes it atomically; :func:`load_dataset` validates it and returns a
:class:`Dataset`. Both apply the same checks, so a file that saves also loads.
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..io import atomic_write_npz, bad_file, require_input_file
from ..safety import check_xml
from ..errors import BadFileError, FlowforceError

__all__ = ["DATASET_FORMAT", "Dataset", "load_dataset", "save_dataset", "topology_from_pdb_text",
           "topology_to_pdb_text"]

#: Format tag written into every dataset file.
DATASET_FORMAT = "openmm-flowforce/dataset/1"

REQUIRED_KEYS = ("positions", "energies", "temperature", "topology_pdb")
OPTIONAL_KEYS = ("format", "forces", "timestep_fs", "save_every_ps", "source", "system_xml", "replica",
                 "provenance", "cg_mapping")

#: Median bond length (nm) above which positions are taken to be in Å: real bonds are
#: 0.1–0.2 nm, i.e. 1–2 in Å.
ANGSTROM_BOND_THRESHOLD_NM = 0.5
#: The same for CG beads: bonded beads are 0.15 nm (backbone) to ~0.7 nm (centres of mass of
#: large residues) apart, i.e. ≥ 1.4 in Å.
CG_ANGSTROM_BOND_THRESHOLD_NM = 1.2


@dataclass
class Dataset:
    """A validated reference dataset.

    Attributes:
        topology: the molecule (``openmm.app.Topology``).
        positions: ``(T, N, 3)`` float32, nm.
        forces: ``(T, N, 3)`` float32, kJ/mol/nm, or ``None`` when the file has none.
        energies: ``(T,)`` float64, kJ/mol.
        temperature: K.
        timestep_fs: MD time step in fs, or ``None``.
        save_every_ps: time between frames in ps, or ``None``.
        source: how the data was made.
        system_xml: the reference System as XML, or ``""``.
        replica: ``(T,)`` int replica index of every frame, or ``None`` (one trajectory).
        provenance: how the replicas were run (a JSON object; ``{}`` when not recorded).
        cg_mapping: the mapping the frames were coarse-grained with
            (``CGMapping.to_dict()``), or ``None`` for all-atom frames.
    """

    topology: Any
    positions: np.ndarray
    forces: np.ndarray | None
    energies: np.ndarray
    temperature: float
    timestep_fs: float | None = None
    save_every_ps: float | None = None
    source: str = ""
    system_xml: str = ""
    replica: np.ndarray | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    cg_mapping: dict[str, Any] | None = None

    def mapping(self) -> Any:
        """The :class:`~openmm_flowforce.coordinates.cg_mapping.CGMapping` of a CG-mapped
        dataset, or ``None`` for all-atom frames."""
        if self.cg_mapping is None:
            return None
        from ..coordinates.cg_mapping import CGMapping

        return CGMapping.from_dict(self.cg_mapping)

    @property
    def n_frames(self) -> int:
        return int(self.positions.shape[0])

    @property
    def n_atoms(self) -> int:
        return int(self.positions.shape[1])


def topology_to_pdb_text(topology, positions_nm: np.ndarray) -> str:
    """PDB text (atoms, residues, chains, CONECT bonds) of a topology at positions ``(N, 3)`` nm."""
    from openmm import app, unit

    buffer = io.StringIO()
    app.PDBFile.writeFile(topology, np.asarray(positions_nm, dtype=np.float64) * 10.0 * unit.angstrom, buffer,
                          keepIds=True)
    return buffer.getvalue()


def topology_from_pdb_text(text: str):
    """``openmm.app.Topology`` from PDB text."""
    from openmm import app

    return app.PDBFile(io.StringIO(text)).topology


def _frames(mask: np.ndarray) -> str:
    bad = np.flatnonzero(mask)
    shown = ", ".join(str(i) for i in bad[:5]) + (f", ... ({len(bad)} in all)" if len(bad) > 5 else "")
    return f"frame{'s' if len(bad) > 1 else ''} {shown}"


def _median_bond_length(topology, positions: np.ndarray) -> float | None:
    """Median bonded distance in the first frame, in the positions' own unit (None: no bonds)."""
    pairs = np.array([(b[0].index, b[1].index) for b in topology.bonds()], dtype=np.int64).reshape(-1, 2)
    if len(pairs) == 0:
        return None
    frame = positions[0].astype(np.float64)
    return float(np.median(np.linalg.norm(frame[pairs[:, 0]] - frame[pairs[:, 1]], axis=-1)))


def _validate(where: str, topology, positions: np.ndarray, forces: np.ndarray | None, energies: np.ndarray,
              temperature: float, angstrom_threshold: float = ANGSTROM_BOND_THRESHOLD_NM) -> None:
    """Shapes, finiteness, units and atom count; raises ValueError naming ``where`` and the fix."""
    if positions.ndim != 3 or positions.shape[-1] != 3:
        raise FlowforceError(f"{where}: positions must have shape (frames, atoms, 3), got {positions.shape}")
    n_frames, n_atoms = positions.shape[:2]
    if n_frames == 0:
        raise FlowforceError(f"{where}: the dataset has no frames")
    if forces is not None and forces.shape != positions.shape:
        raise FlowforceError(f"{where}: forces have shape {forces.shape} but positions {positions.shape}; "
                             "they must be the same (frames, atoms, 3)")
    if energies.shape != (n_frames,):
        raise FlowforceError(f"{where}: energies must have shape ({n_frames},), one per frame, got {energies.shape}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise FlowforceError(f"{where}: temperature must be a positive number of kelvin, got {temperature}")
    n_topology = topology.getNumAtoms()
    if n_topology != n_atoms:
        raise FlowforceError(f"{where}: the topology has {n_topology} atoms but positions have {n_atoms}; "
                             "the positions belong to another molecule")
    arrays = {"positions": positions.reshape(n_frames, -1), "energies": energies.reshape(n_frames, 1)}
    if forces is not None:
        arrays["forces"] = forces.reshape(n_frames, -1)
    for name, array in arrays.items():
        bad = ~np.isfinite(array).all(axis=1)
        if bad.any():
            raise FlowforceError(f"{where}: {_frames(bad)} of {name} contain NaN or inf; drop those frames "
                                 f"(e.g. keep = np.isfinite({name}).all(axis=...)) or regenerate the data")
    bond = _median_bond_length(topology, positions)
    if bond is not None and bond > angstrom_threshold:
        raise FlowforceError(f"{where}: positions look like Ångström (median bond length {bond:.3g}, real bonds "
                             f"are 0.1–0.2 nm, CG bonds below {CG_ANGSTROM_BOND_THRESHOLD_NM:g} nm); positions must "
                             "be in nm: divide them by 10")


def _validate_replicas(where: str, replica: np.ndarray | None, n_frames: int) -> None:
    if replica is None:
        return
    if replica.shape != (n_frames,) or not np.issubdtype(replica.dtype, np.integer) or (replica < 0).any():
        raise FlowforceError(f"{where}: replica must be ({n_frames},) non-negative integers, one per frame, got "
                             f"shape {replica.shape} dtype {replica.dtype}")


def _mapping_from_dict(where: str, data: Any, n_beads: int | None) -> Any:
    """The CGMapping of a stored dict, checked against the number of beads in the frames."""
    from ..coordinates.cg_mapping import CGMapping

    if not isinstance(data, dict):
        raise FlowforceError(f"{where}: cg_mapping must be a JSON object (CGMapping.to_dict()), got "
                             f"{type(data).__name__}")
    try:
        mapping = CGMapping.from_dict(data)
    except FlowforceError as error:
        raise FlowforceError(f"{where}: cg_mapping is not a valid CG mapping ({error})") from None
    if n_beads is not None and mapping.n_beads != n_beads:
        raise FlowforceError(f"{where}: cg_mapping has {mapping.n_beads} beads but the frames have {n_beads}")
    return mapping


def save_dataset(
    path: str | os.PathLike,
    *,
    topology,
    positions: np.ndarray,
    energies: np.ndarray,
    temperature: float,
    forces: np.ndarray | None = None,
    timestep_fs: float | None = None,
    save_every_ps: float | None = None,
    source: str = "",
    system=None,
    replica: np.ndarray | None = None,
    provenance: dict[str, Any] | None = None,
    cg_mapping: Any = None,
) -> None:
    """Validate and write a dataset file atomically (schema in the module docstring).

    Args:
        path: output file (``.npz`` by convention; written exactly at this path).
        topology: ``openmm.app.Topology`` of the molecule.
        positions: ``(T, N, 3)`` nm (stored as float32).
        energies: ``(T,)`` kJ/mol (stored as float64).
        temperature: K.
        forces: ``(T, N, 3)`` kJ/mol/nm (stored as float32), optional.
        timestep_fs, save_every_ps, source: metadata.
        system: the reference ``openmm.System``, or its XML as read from a dataset
            (``Dataset.system_xml``, already checked on load); stored as XML so samples can be
            reweighted to it (a System holding a TorchForce cannot be stored). Not with
            ``cg_mapping``.
        replica: ``(T,)`` replica index of every frame (stored as int32).
        provenance: JSON-able dict: how the data was made, per replica.
        cg_mapping: a :class:`~openmm_flowforce.coordinates.cg_mapping.CGMapping`: the
            positions and forces are its beads' (``(T, n_beads, 3)``), already mapped;
            ``topology`` may then be None (the CG topology is the mapping's).

    Raises:
        ValueError: the data would not load back (shapes, NaN frames, Å positions, atom count).
    """
    positions = np.asarray(positions, dtype=np.float32)
    energies = np.asarray(energies, dtype=np.float64)
    forces = None if forces is None else np.asarray(forces, dtype=np.float32)
    where = f"dataset for {path}"
    threshold = ANGSTROM_BOND_THRESHOLD_NM
    if cg_mapping is not None:
        if system is not None:
            raise FlowforceError(f"{where}: a CG-mapped dataset cannot store the all-atom System; pass system=None")
        if positions.ndim == 3 and positions.shape[1] != cg_mapping.n_beads:
            raise FlowforceError(f"{where}: positions have {positions.shape[1]} particles but the CG mapping has "
                                 f"{cg_mapping.n_beads} beads: map them first (CGMapping.map_positions)")
        topology, threshold = cg_mapping.cg_topology(), CG_ANGSTROM_BOND_THRESHOLD_NM
    _validate(where, topology, positions, forces, energies, float(temperature), threshold)
    replica = None if replica is None else np.asarray(replica)
    _validate_replicas(where, replica, len(positions))
    topology_pdb = (cg_mapping.pdb_text(positions[0]) if cg_mapping is not None
                    else topology_to_pdb_text(topology, positions[0]))
    arrays: dict[str, np.ndarray] = {
        "format": np.array(DATASET_FORMAT),
        "positions": positions,
        "energies": energies,
        "temperature": np.array(float(temperature)),
        "topology_pdb": np.array(topology_pdb),
        "source": np.array(str(source)),
    }
    if replica is not None:
        arrays["replica"] = replica.astype(np.int32)
    if provenance is not None:
        arrays["provenance"] = np.array(json.dumps(provenance, allow_nan=False))
    if cg_mapping is not None:
        arrays["cg_mapping"] = np.array(json.dumps(cg_mapping.to_dict(), allow_nan=False))
    if forces is not None:
        arrays["forces"] = forces
    if timestep_fs is not None:
        arrays["timestep_fs"] = np.array(float(timestep_fs))
    if save_every_ps is not None:
        arrays["save_every_ps"] = np.array(float(save_every_ps))
    if isinstance(system, str):
        check_xml(system, f"the reference System for {path}")
        arrays["system_xml"] = np.array(system)
    elif system is not None:
        from openmm import XmlSerializer
        arrays["system_xml"] = np.array(XmlSerializer.serialize(system))
    atomic_write_npz(path, arrays)


def _scalar(where: str, name: str, value: np.ndarray, kind: type) -> Any:
    if value.shape != ():
        raise FlowforceError(f"{where}: {name} must be a scalar, got shape {value.shape}")
    try:
        return kind(value.item())
    except (TypeError, ValueError):
        raise FlowforceError(f"{where}: {name} must be a {kind.__name__}, got {value.item()!r}") from None


def _json(where: str, name: str, value: np.ndarray) -> Any:
    text = _scalar(where, name, value, str)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise FlowforceError(f"{where}: {name} is not valid JSON ({error})") from None


def _numeric(where: str, name: str, value: np.ndarray, dtype: type) -> np.ndarray:
    if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
        raise FlowforceError(f"{where}: {name} must be a numeric array, got dtype {value.dtype}")
    return np.asarray(value, dtype=dtype)


def load_dataset(path: str | os.PathLike, trust: bool | None = None) -> Dataset:
    """Read and validate a dataset file (schema in the module docstring).

    Args:
        path: the ``.npz`` file.
        trust: accept a ``system_xml`` that could run code when deserialised (see
            :mod:`openmm_flowforce.safety`); by default such a dataset is refused on load,
            so it is never copied into a model.

    Raises:
        MissingFileError: the file does not exist.
        BadFileError: the file is empty, not a readable ``.npz``, or a key is missing or
            unknown. FlowforceError: shapes disagree, frames contain NaN (named by index),
            positions look like Å, or the atom count differs from the topology's.
        UnsafeFileError: ``system_xml`` holds a PythonForce or anything else that could run
            code (unless ``trust``). Every message names the file.
    """
    fix = "re-create it with `flowforce md` or save_dataset"
    path = require_input_file(path, "a flowforce .npz dataset", fix)
    where = str(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise bad_file(path, "a flowforce .npz dataset", "a single .npy array, not an .npz archive", fix)
        with loaded as npz:
            arrays = {key: npz[key] for key in npz.files}
    except BadFileError:
        raise
    except Exception as error:  # numpy, zipfile, zlib and struct raise many types for bad archives
        raise bad_file(path, "a flowforce .npz dataset", error, fix) from None

    missing = [key for key in REQUIRED_KEYS if key not in arrays]
    if len(missing) == len(REQUIRED_KEYS):
        names = sorted(arrays)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise BadFileError(f"{where} is not a flowforce dataset: it holds {shown or 'no arrays'}, none of "
                           f"{', '.join(REQUIRED_KEYS)}; {fix}")
    if missing:
        raise BadFileError(f"{where}: missing {', '.join(missing)} (the file has "
                           f"{', '.join(sorted(arrays)) or 'no arrays'}); a dataset needs {', '.join(REQUIRED_KEYS)}, "
                           f"optionally {', '.join(OPTIONAL_KEYS)}: is it a flowforce dataset?")
    unknown = sorted(set(arrays) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise FlowforceError(f"{where}: unknown keys {', '.join(unknown)}; a dataset has {', '.join(REQUIRED_KEYS)} "
                             f"and optionally {', '.join(OPTIONAL_KEYS)}")
    if "format" in arrays:
        found = _scalar(where, "format", arrays["format"], str)
        if found != DATASET_FORMAT:
            raise FlowforceError(f"{where}: format {found!r} is not {DATASET_FORMAT!r}; this version of flowforce "
                                 "cannot read it")

    positions = _numeric(where, "positions", arrays["positions"], np.float32)
    json_fields = {name: _json(where, name, arrays[name]) if name in arrays else None
                   for name in ("provenance", "cg_mapping")}
    text = _scalar(where, "topology_pdb", arrays["topology_pdb"], str)
    threshold = ANGSTROM_BOND_THRESHOLD_NM
    if json_fields["cg_mapping"] is not None:
        # The mapping, not the PDB text, defines the CG topology (PDB readers add template bonds).
        n_beads = positions.shape[1] if positions.ndim == 3 else None  # else _validate names the bad shape
        topology = _mapping_from_dict(where, json_fields["cg_mapping"], n_beads).cg_topology()
        threshold = CG_ANGSTROM_BOND_THRESHOLD_NM
    else:
        try:
            topology = topology_from_pdb_text(text)
        except Exception as error:  # PDBFile raises several types on malformed text
            raise FlowforceError(f"{where}: topology_pdb is not valid PDB text ({type(error).__name__}: "
                                 f"{error})") from None
    forces = _numeric(where, "forces", arrays["forces"], np.float32) if "forces" in arrays else None
    energies = _numeric(where, "energies", arrays["energies"], np.float64)
    temperature = _scalar(where, "temperature", arrays["temperature"], float)
    _validate(where, topology, positions, forces, energies, temperature, threshold)
    replica = arrays.get("replica")
    _validate_replicas(where, replica, len(positions))
    provenance = json_fields["provenance"]
    if provenance is not None and not isinstance(provenance, dict):
        raise FlowforceError(f"{where}: provenance must be a JSON object, got {type(provenance).__name__}")
    optional = {name: _scalar(where, name, arrays[name], float) if name in arrays else None
                for name in ("timestep_fs", "save_every_ps")}
    text_fields = {name: _scalar(where, name, arrays[name], str) if name in arrays else ""
                   for name in ("source", "system_xml")}
    if text_fields["system_xml"]:
        check_xml(text_fields["system_xml"], f"the reference System (system_xml) in {where}", trust)
    if text_fields["system_xml"] and json_fields["cg_mapping"] is not None:
        raise FlowforceError(f"{where}: a CG-mapped dataset cannot hold an all-atom system_xml; the file was altered")
    return Dataset(topology=topology, positions=positions, forces=forces, energies=energies,
                   temperature=temperature, **text_fields, **optional,
                   replica=None if replica is None else replica.astype(np.int64),
                   provenance=provenance or {}, cg_mapping=json_fields["cg_mapping"])
