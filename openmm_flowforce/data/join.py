"""Several datasets of one molecule as one: replicas run apart (other machines, other seeds,
later), joined with their replica indices and provenance kept.

``flowforce convert a.npz b.npz --out all.npz`` writes the join; ``train``, ``cg`` and
``evaluate`` read several ``.npz`` files the same way (:func:`~openmm_flowforce.data.trajectory.load_data`).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ..errors import FlowforceError
from .dataset import Dataset


def _atoms(data: Dataset) -> list[tuple[str, str, str]]:
    return [(atom.name, atom.element.symbol if atom.element is not None else "", atom.residue.name)
            for atom in data.topology.atoms()]


def _bonds(data: Dataset) -> set[tuple[int, int]]:
    return {tuple(sorted((a.index, b.index))) for a, b in data.topology.bonds()}


def _same_or_none(values: Sequence[float | None]) -> float | None:
    """The common value of an optional float, or None when any file lacks it or they differ."""
    if any(v is None for v in values):
        return None
    return values[0] if all(math.isclose(v, values[0], rel_tol=1e-9) for v in values) else None


def _check_compatible(datasets: Sequence[Dataset], names: Sequence[str]) -> None:
    first, name0 = datasets[0], names[0]
    for data, name in zip(datasets[1:], names[1:]):
        fix = "join only datasets of one molecule, System and temperature"
        if data.cg_mapping != first.cg_mapping:
            raise FlowforceError(f"cannot join {name} to {name0}: their CG mappings differ "
                                 "(one all-atom and one mapped, or other beads); " + fix)
        if data.n_atoms != first.n_atoms or _atoms(data) != _atoms(first) or _bonds(data) != _bonds(first):
            raise FlowforceError(f"cannot join {name} to {name0}: the molecules differ ({data.n_atoms} vs "
                                 f"{first.n_atoms} particles, or other atom names, residues or bonds); " + fix)
        if not math.isclose(data.temperature, first.temperature, rel_tol=1e-9):
            raise FlowforceError(f"cannot join {name} ({data.temperature:g} K) to {name0} ({first.temperature:g} K): "
                                 "different temperatures are different ensembles; " + fix)
        if data.system_xml != first.system_xml:
            raise FlowforceError(f"cannot join {name} to {name0}: their reference Systems (system_xml) differ "
                                 "(force field, solvent, constraints or masses); " + fix)
        if (data.forces is None) != (first.forces is None):
            has, lacks = (name, name0) if first.forces is None else (name0, name)
            raise FlowforceError(f"cannot join {has} (with forces) to {lacks} (without): every file needs forces "
                                 "or none; drop the forces or record them for every run")


def join_datasets(datasets: Sequence[Dataset], names: Sequence[str]) -> Dataset:
    """One dataset from several of the same molecule, System and temperature, in the given order.

    Replicas are renumbered so they stay apart: file k's replica r becomes r plus the number
    of replicas before it (a file without replica indices is one replica). The provenance
    keeps each file's record under ``"joined"`` (with its name and replica offset) and the
    per-replica records of ``flowforce md`` renumbered under ``"replicas"``. Time step and
    frame spacing are kept where all files agree, else dropped.

    Raises:
        FlowforceError: fewer than one dataset, or files that differ in molecule, CG mapping,
            temperature, reference System or presence of forces (the message names both files).
    """
    if not datasets or len(datasets) != len(names):
        raise FlowforceError("join_datasets needs one name per dataset and at least one dataset")
    _check_compatible(datasets, names)
    replicas, records, joined, offset = [], [], [], 0
    for data, name in zip(datasets, names):
        own = np.zeros(data.n_frames, dtype=np.int64) if data.replica is None else data.replica.astype(np.int64)
        replicas.append(own + offset)
        for record in (data.provenance or {}).get("replicas", []):
            records.append({**record, "replica": int(record.get("replica", 0)) + offset, "file": name})
        joined.append({"file": name, "frames": data.n_frames, "replica_offset": offset,
                       "source": data.source, "provenance": data.provenance or {}})
        offset += int(own.max()) + 1 if len(own) else 1
    first = datasets[0]
    provenance: dict[str, Any] = {"joined": joined}
    if records:
        provenance["replicas"] = records
    return Dataset(
        topology=first.topology,
        positions=np.concatenate([d.positions for d in datasets]),
        forces=None if first.forces is None else np.concatenate([d.forces for d in datasets]),
        energies=np.concatenate([d.energies for d in datasets]),
        temperature=first.temperature,
        timestep_fs=_same_or_none([d.timestep_fs for d in datasets]),
        save_every_ps=_same_or_none([d.save_every_ps for d in datasets]),
        source="joined: " + "; ".join(f"{name} ({d.source})" if d.source else name for d, name in zip(datasets, names)),
        system_xml=first.system_xml,
        replica=np.concatenate(replicas),
        provenance=provenance,
        cg_mapping=first.cg_mapping,
    )
