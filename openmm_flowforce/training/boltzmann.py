"""Train a Boltzmann generator of a molecule on MD positions (and forces, when given)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..conventions import kT
from ..potentials import BoltzmannGenerator
from ..reporters import Reporter
from ..engine import data_hash, fingerprint
from .trainer import TrainConfig, Trainer
from ..errors import FlowforceError
from ..options import POSITIVE, POSITIVE_INT, Option, check_options

#: Flow architecture used when the caller does not say otherwise.
FLOW_DEFAULTS: dict[str, Any] = {"transform": "smooth", "n_layers": 8, "hidden": [128, 128], "n_components": 8}


#: Type and range of every flow option (YAML ``flow:`` keys); the transform's name is
#: checked by the bijection registry, which lists the valid ones.
FLOW_OPTIONS: dict[str, Option] = {
    "transform": Option(str), "n_layers": POSITIVE_INT, "hidden": Option(list, item=POSITIVE_INT),
    "n_components": POSITIVE_INT, "identity_init": Option(bool),
}


def flow_options(options: Mapping[str, Any] | None, where: str = "") -> dict[str, Any]:
    """Defaults overlaid with ``options``, checked against :data:`FLOW_OPTIONS`.

    Raises:
        OptionError: an unknown key (listing the valid ones) or a bad value.
    """
    return {**FLOW_DEFAULTS, **check_options(dict(options or {}), FLOW_OPTIONS, where, section="flow")}


def split_frames(n_frames: int, val_fraction: float) -> tuple[slice, slice]:
    """Train on the first frames and validate on the last ``val_fraction``: a contiguous
    block, because consecutive MD frames are correlated and a random split would leak."""
    if not 0.0 <= val_fraction < 1.0:
        raise FlowforceError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n_frames * val_fraction))
    if n_frames - n_val < 2:
        raise FlowforceError(f"{n_frames} frames are too few to train on; record a longer trajectory")
    return slice(0, n_frames - n_val), slice(n_frames - n_val, n_frames)


def steps_for_epochs(epochs: float, n_train: int, batch_size: int) -> int:
    """Optimiser steps that show every training frame ``epochs`` times on average."""
    POSITIVE.check("epochs", epochs)
    return max(1, math.ceil(epochs * n_train / batch_size))


def train_boltzmann_generator(topology, positions_nm: np.ndarray, checkpoint: str | Path,
                              forces_kj_mol_nm: np.ndarray | None = None, temperature: float = 300.0,
                              weights: Mapping[str, float] | None = None,
                              flow: Mapping[str, Any] | None = None, config: TrainConfig | None = None,
                              val_fraction: float = 0.1, log_path: str | Path | None = None,
                              progress: bool = True, dtype: torch.dtype = torch.float32,
                              extra_metadata: Mapping[str, Any] | None = None,
                              reporters: Sequence[Reporter] = (),
                              device: torch.device | str = "cpu") -> tuple[BoltzmannGenerator, Trainer]:
    """Build internal coordinates and a flow for the molecule and train them.

    Args:
        topology: OpenMM topology of the molecule.
        positions_nm: (T, N, 3) MD frames in nm.
        checkpoint: model file to write (a trainer checkpoint; resumes if it exists).
        forces_kj_mol_nm: (T, N, 3) forces for the ``force`` term, kJ/mol/nm.
        temperature: K; forces are reduced by kT.
        weights: loss weights, default ``{"nll": 1}``.
        flow: CouplingFlow options over :data:`FLOW_DEFAULTS`.
        config: :class:`TrainConfig`.
        val_fraction: the last frames held out for validation NLL and early stopping.
        log_path: JSON-lines metrics log.
        extra_metadata: stored in the model file (e.g. how the reference System was built).
        device: where the model and the data live during training (``cuda:0``...).

    An existing ``checkpoint`` is resumed only if it was trained from the same frames
    (forces, temperature) and the same flow options and ``val_fraction``; otherwise
    :class:`~openmm_flowforce.errors.FlowforceError` says what differs.

    Returns:
        The trained model (best validation state) and its trainer.
    """
    weights = dict(weights or {"nll": 1.0})
    if "force" in weights and forces_kj_mol_nm is None:
        raise FlowforceError("the 'force' loss needs forces; the data file has none (re-run `flowforce md`)")
    config = config or TrainConfig()
    checkpoint = Path(checkpoint)
    flow = flow_options(flow)
    used_forces = forces_kj_mol_nm if "force" in weights else None
    trained_from = fingerprint(data_hash(positions_nm, used_forces, float(temperature)),
                               {"flow": flow, "val_fraction": float(val_fraction), "dtype": str(dtype)})
    train, val = split_frames(len(positions_nm), val_fraction)
    x = torch.as_tensor(np.asarray(positions_nm), dtype=dtype)
    with torch.random.fork_rng(devices=[]):  # initial weights from the seed alone; the caller's RNG is untouched
        torch.manual_seed(config.seed)
        model = BoltzmannGenerator.from_topology(topology, x[train].double().numpy(), **flow).to(dtype).to(device)
    data = {"x": x[train]}
    if "force" in weights:
        data["forces"] = torch.as_tensor(np.asarray(forces_kj_mol_nm), dtype=dtype)[train] / kT(temperature)
    val_data = {"x": x[val]} if val.stop > val.start else {}
    metadata = {**model.metadata(), "temperature": float(temperature), **dict(extra_metadata or {})}
    trainer = Trainer(model, weights, data=data, val_data=val_data, config=config, checkpoint=checkpoint,
                      metadata=metadata, reporters=reporters, fingerprint=trained_from, log_path=log_path,
                      progress=progress)
    trainer.run()
    return model, trainer
