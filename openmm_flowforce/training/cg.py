r"""Force matching of CG energy networks on mapped all-atom data.

    L(θ) = E_data ‖F_θ(X) − F_mapped‖² / (3n · s²),

the mean squared error per force component between the network's forces ``−∇E_θ`` and the
mapped all-atom forces (kJ/mol/nm), divided by a force scale ``s²``. Its minimiser is the
mean force, so ``E_θ`` approaches the CG potential of mean force (multiscale coarse-graining:
Noid et al., J. Chem. Phys. 128, 244114 (2008); Köhler, Chen, Krämer, Clementi, Noé, JCTC
2023, arXiv:2203.11167). The mapped forces are very noisy estimates of the mean force, so
even a perfect model leaves a large loss; compare losses, not their absolute value.

:func:`train_cg_net` uses :class:`~openmm_flowforce.training.trainer.TrainConfig` for its
settings and the :class:`~openmm_flowforce.engine.Engine` for its loop; its step and
validation are force matching (an energy network has no normalised density). Checkpoints
have the trainer's layout (``model``, ``metadata``, ``engine``...), so
:func:`~openmm_flowforce.potentials.cg_net.load_cg_net` reads them.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..io import CHECKPOINT_FORMAT
from ..potentials.cg_net import CGNet, cg_metadata
from .boltzmann import split_frames
from ..engine import Engine, StateOf, cosine_schedule, data_parallel, shard
from ..reporters import Reporter
from .trainer import TrainConfig
from ..errors import FlowforceError

if TYPE_CHECKING:
    from .internal_forces import InternalForceLoss

Tensor = torch.Tensor

__all__ = ["CGTrainResult", "force_matching_loss", "force_scale_of", "huber_per_frame", "train_cg_net"]


def force_scale_of(forces: Tensor) -> float:
    """Root mean square of the force components (kJ/mol/nm): dividing by it makes the loss of
    the zero force field 1."""
    return float(forces.detach().double().pow(2).mean().sqrt())


def huber_per_frame(squared: Tensor, delta: float | None) -> Tensor:
    """Huber's loss of per-frame squared residuals ``r`` ``(B,)`` (Huber, "Robust estimation of a
    location parameter", Ann. Math. Statist. 35, 73 (1964)): ``r`` where ``√r ≤ δ``, else
    ``2δ√r − δ²``, the same value and slope at ``√r = δ``.

    A frame whose forces disagree with the net by ``√r`` RMS units pulls on the net as hard as
    one at ``δ`` beyond that, not ``√r/δ`` times harder: flow samples whose forces sit in the
    flow's heavy tail (a few % of them carry most of the squared residual on chignolin) no
    longer decide the fit. ``delta`` None: ``r`` itself (the plain loss).

    Args:
        squared: ``(B,)`` non-negative per-frame squared residuals (force-scale units).
        delta: the per-frame RMS residual where the loss turns linear, > 0, or None.
    """
    if delta is None:
        return squared
    d2 = float(delta) ** 2
    # The clamp keeps the unused branch's sqrt (and its gradient) finite below δ².
    return torch.where(squared <= d2, squared, 2.0 * float(delta) * squared.clamp_min(d2).sqrt() - d2)


def force_matching_loss(net: CGNet, positions: Tensor, forces: Tensor, force_scale: float = 1.0) -> Tensor:
    """Mean over frames, beads and components of ``((F_net − F) / force_scale)²``.

    Args:
        net: the energy network; in training mode for a loss that can be back-propagated.
        positions: CG positions ``(B, n, 3)`` nm.
        forces: mapped forces ``(B, n, 3)`` kJ/mol/nm.
        force_scale: kJ/mol/nm, e.g. :func:`force_scale_of` of the training forces.
    """
    if positions.shape != forces.shape:
        raise FlowforceError(f"positions {tuple(positions.shape)} and forces {tuple(forces.shape)} must have one shape")
    _, predicted = net.energy_and_forces(positions)
    return ((predicted - forces) / force_scale).pow(2).mean()


@dataclass
class CGTrainResult:
    """What :func:`train_cg_net` measured (losses are :func:`force_matching_loss` values).

    Attributes:
        force_scale: kJ/mol/nm, RMS of the training forces.
        initial_val_loss: validation loss before training (priors only, for a fresh net).
        best_val_loss: best validation loss; the net ends with those parameters.
        last_train_loss: loss of the last training batch.
        steps: optimiser steps done in total.
        stopped_early: patience ran out.
    """

    force_scale: float
    initial_val_loss: float | None
    best_val_loss: float | None
    last_train_loss: float
    steps: int
    stopped_early: bool


def _validation_loss(loss: Callable[..., Tensor], net: CGNet, *tensors: Tensor, chunk: int = 2048) -> float:
    was_training = net.training
    net.eval()
    total, n = 0.0, len(tensors[0])
    for i in range(0, n, chunk):
        part = [t[i:i + chunk] for t in tensors]
        total += float(loss(net, *part).detach()) * len(part[0])
    net.train(was_training)
    return total / n


def train_cg_net(net: CGNet, positions: Any, forces: Any, config: TrainConfig | None = None,
                 val_fraction: float = 0.1, checkpoint: str | Path | None = None, resume: bool = True,
                 progress: bool = True, reporters: Sequence[Reporter] = (), mapping: Any = None,
                 fingerprint: Mapping[str, Any] | None = None,
                 internal: "InternalForceLoss | None" = None, energies: Any = None,
                 energy_weight: float = 0.0, huber: float | None = None) -> CGTrainResult:
    """Train ``net`` by force matching with Adam and a cosine learning-rate schedule.

    Args:
        net: a network with fitted priors (``from_data`` of ``CGEnergyNet`` or ``CGSchNet``); trained in place in
            the dtype and on the device of its parameters.
        positions: CG positions ``(T, n, 3)`` nm.
        forces: mapped forces ``(T, n, 3)`` kJ/mol/nm (``mapping.map_forces``).
        config: ``steps``, ``batch_size``, ``lr``, ``lr_final_factor``, ``weight_decay``,
            ``grad_clip``, ``validate_every``, ``patience``, ``checkpoint_every``, ``seed``
            (``n_samples`` must stay 0: force matching draws no samples).
        val_fraction: the last frames held out for validation (a contiguous block, as MD
            frames are correlated); 0 disables validation.
        checkpoint: file written atomically every ``checkpoint_every`` steps, at the end and on
            Ctrl-C (at a step boundary); if it exists and ``resume`` is set, training continues
            from it.
        progress: show a tqdm bar.
        reporters: extra reporters; they see ``losses = {"force": ...}`` and the validation
            loss as ``val_nll``.
        mapping: stored in the checkpoint's metadata so the model file is self-contained.
        fingerprint: what the run is trained from (:func:`~openmm_flowforce.engine.fingerprint`); a checkpoint
            from other data or options is refused.
        internal: match generalised forces on internal coordinates instead of Cartesian
            forces (:class:`~openmm_flowforce.training.internal_forces.InternalForceLoss`;
            its scales are fitted to the training forces here).
        energies: target energies ``(T,)`` kJ/mol up to a constant (flow-matching:
            ``−kT log q``), used with ``energy_weight`` > 0: the loss gains
            ``energy_weight × Var_batch(E_θ − U) / Var(U)``, which fixes free-energy
            differences between regions that forces alone connect only through the data.
        energy_weight: weight of that energy term (0: forces only).
        huber: δ of a robust force loss (:func:`huber_per_frame` of each frame's squared
            residual, Cartesian or internal); None: the plain mean of squares.

    Returns:
        :class:`CGTrainResult`. With validation, the net ends with the parameters of the best
        validation loss, the starting parameters included.

    Raises:
        ValueError: shapes that disagree, ``n_samples`` set, too few frames.
        FloatingPointError: a non-finite loss (names the step).
    """
    cfg = config or TrainConfig()
    if cfg.n_samples:
        raise FlowforceError(f"n_samples={cfg.n_samples} is for the reverse-KL loss; force matching draws no samples")
    parameter = next(net.parameters())
    x = torch.as_tensor(np.asarray(positions) if not isinstance(positions, Tensor) else positions)
    f = torch.as_tensor(np.asarray(forces) if not isinstance(forces, Tensor) else forces)
    x, f = x.to(parameter), f.to(parameter)
    if x.ndim != 3 or tuple(x.shape[1:]) != (net.n_beads, 3) or f.shape != x.shape:
        raise FlowforceError(f"positions {tuple(x.shape)} and forces {tuple(f.shape)} must both be "
                             f"(T, {net.n_beads}, 3)")
    train, val = split_frames(len(x), val_fraction)
    x_train, f_train, x_val, f_val = x[train], f[train], x[val], f[val]
    use_energy = energy_weight > 0
    if use_energy:
        if energies is None:
            raise FlowforceError("energy_weight > 0 needs target energies at the training points")
        u = torch.as_tensor(np.asarray(energies) if not isinstance(energies, Tensor) else energies).to(parameter)
        if u.shape != (len(x),):
            raise FlowforceError(f"energies {tuple(u.shape)} must be ({len(x)},), one per frame")
        u_train, u_val = u[train], u[val]
        energy_scale = float(u_train.var()) or 1.0
    else:
        u_train, u_val = torch.zeros(len(x)).to(x)[train], torch.zeros(len(x)).to(x)[val]
    validate = len(x_val) > 0 and cfg.validate_every > 0
    scale = force_scale_of(f_train)

    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch_rng = torch.Generator().manual_seed(cfg.seed)
    info: dict[str, Any] = {"initial_val": None}
    metadata = cg_metadata(net, mapping)

    if internal is None:
        p_train = p_val = torch.zeros(len(x), 0).to(x)  # no projections: a placeholder to index
        p_train, p_val = p_train[train], p_val[val]
    else:
        p_train, p_val = internal.projections(x_train), internal.projections(x_val)
        internal.fit_scales(p_train, f_train)

    def loss_fn(model: CGNet, x: Tensor, f: Tensor, p: Tensor, u: Tensor) -> Tensor:
        energy, predicted = model.energy_and_forces(x)
        if internal is None:
            per_frame = ((predicted - f) / scale).pow(2).flatten(1).mean(1)
        else:
            per_frame = internal.per_frame(p, predicted, f)
        loss = huber_per_frame(per_frame, huber).mean()
        if use_energy:  # the constant offset of U is free: compare energies about their batch mean
            delta = energy - u
            loss = loss + energy_weight * (delta - delta.mean()).pow(2).mean() / energy_scale
        return loss
    loss_of = data_parallel(net, loss_fn)

    def step() -> dict[str, float]:
        # In a distributed run, this process's shard of the global batch; gradients averaged over all.
        idx = shard(torch.randint(len(x_train), (cfg.batch_size,), generator=batch_rng))
        loss = loss_of(x_train[idx], f_train[idx], p_train[idx], u_train[idx])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"force-matching loss is {float(loss)} at step {engine.step + 1}; lower the "
                                     "learning rate or check the data for outliers")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        optimizer.step()
        return {"force": float(loss.detach())}

    def check(saved: dict[str, Any]) -> None:
        if mapping is None:  # a resumed run keeps the mapping the first run stored
            metadata["mapping"] = saved.get("metadata", {}).get("mapping")

    engine = Engine(net, step, cfg.steps, optimizer=optimizer, scheduler=cosine_schedule(optimizer, cfg.steps,
                                                                                        cfg.lr_final_factor),
                    checkpoint=checkpoint, checkpoint_every=cfg.checkpoint_every, fmt=CHECKPOINT_FORMAT,
                    payload=lambda: {"format": CHECKPOINT_FORMAT, "force_scale": scale, "config": asdict(cfg),
                                     "metadata": metadata},
                    fingerprint=fingerprint, state={"cg": StateOf(lambda: dict(info), info.update)},
                    generators={"batch": batch_rng},
                    validate=(lambda: _validation_loss(loss_fn, net, x_val, f_val, p_val, u_val)) if validate else None,
                    validate_every=cfg.validate_every, patience=cfg.patience, reporters=reporters,
                    progress="CG force matching" if progress else None, check=check, seed=cfg.seed)
    if resume:
        engine.resume()
    if validate and info["initial_val"] is None:
        # The starting parameters (for a fresh net: priors only) compete for "best" too, so
        # training never hands back a net that validates worse than the one it was given.
        info["initial_val"] = engine.best_val = _validation_loss(loss_fn, net, x_val, f_val, p_val, u_val)
        engine.best_state = copy.deepcopy(net.state_dict())
    metrics = engine.run()
    best = engine.best_val
    return CGTrainResult(scale, info["initial_val"], best if math.isfinite(best) else None,
                         float(metrics.get("force", math.nan)), engine.step, engine.stopped_early)
