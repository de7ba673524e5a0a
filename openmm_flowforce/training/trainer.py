"""Trainer of density models by named losses; the loop, checkpoints and exact resume are
those of :class:`~openmm_flowforce.engine.Engine`."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..io import CHECKPOINT_FORMAT
from ..engine import Engine, cosine_schedule, data_parallel, shard, world
from .losses import nll_on_data, weighted_loss
from ..reporters import Reporter, TrainState
from ..errors import FlowforceError
from ..options import COUNT, NON_NEGATIVE, POSITIVE, POSITIVE_INT, SEED, Option, check_options

Tensor = torch.Tensor


@dataclass
class TrainConfig:
    """Optimisation settings. Unknown keys are rejected by :meth:`from_dict`.

    Attributes:
        steps: optimiser steps in total (a resumed run continues to this number).
        batch_size: data points per step.
        lr: initial learning rate of Adam.
        lr_final_factor: the cosine schedule decays the rate to ``lr·lr_final_factor``.
        weight_decay: Adam's L2 penalty.
        grad_clip: clip the gradient norm to this (0 disables).
        validate_every: steps between validation NLL evaluations (0 disables).
        patience: stop after this many validations without improvement (0 disables).
        checkpoint_every: steps between checkpoints (the last step always checkpoints).
        n_samples: flow samples per step for the reverse-KL term (default: batch_size).
        seed: seeds parameters' initialisation order-independent RNG, batches and samples.
    """

    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    lr_final_factor: float = 0.01
    weight_decay: float = 0.0
    grad_clip: float = 100.0
    validate_every: int = 100
    patience: int = 0
    checkpoint_every: int = 500
    n_samples: int = 0
    seed: int = 0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "", section: str = "") -> "TrainConfig":
        """A config from a mapping checked against :data:`TRAIN_CONFIG_OPTIONS` (unknown keys
        and bad values are rejected, naming ``where`` and ``section`` in the message)."""
        return cls(**check_options(values, TRAIN_CONFIG_OPTIONS, where, section=section))


#: Type and range of every :class:`TrainConfig` field (YAML ``train:`` keys, ``--lr`` ...).
TRAIN_CONFIG_OPTIONS: dict[str, Option] = {
    "steps": POSITIVE_INT, "batch_size": POSITIVE_INT, "lr": POSITIVE,
    "lr_final_factor": Option(float, minimum=0.0, maximum=1.0), "weight_decay": NON_NEGATIVE,
    "grad_clip": NON_NEGATIVE, "validate_every": COUNT, "patience": COUNT, "checkpoint_every": POSITIVE_INT,
    "n_samples": COUNT, "seed": SEED,
}


class Trainer:
    """Fits a density model by a weighted sum of named losses.

    Args:
        model: an ``nn.Module`` with ``log_prob`` and ``sample_and_log_prob``.
        weights: loss weights by name (``nll``, ``force``, ``reverse_kl``, ``bi_lipschitz``).
        data: training tensors; ``"x"`` (N, ...) and optionally ``"forces"`` (N, ...) in
            reduced units (÷ kT). May be omitted for pure reverse-KL training.
        val_data: validation ``"x"`` for the validation NLL and early stopping.
        reduced_energy: u(x) = E(x)/kT for the reverse-KL term.
        config: :class:`TrainConfig`.
        checkpoint: path of the checkpoint; if it exists and ``resume`` is set, training
            continues exactly where it stopped.
        reporters: extra :class:`Reporter` s.
        metadata: plain data stored with every checkpoint (how to rebuild the model).
        fingerprint: what the run is trained from (:func:`~openmm_flowforce.engine.fingerprint`); a
            checkpoint from other data or options is refused.
        log_path: JSON-lines metrics log (every 10 steps); progress: a progress bar.
    """

    def __init__(self, model: torch.nn.Module, weights: Mapping[str, float],
                 data: Mapping[str, Tensor] | None = None, val_data: Mapping[str, Tensor] | None = None,
                 reduced_energy: Callable[[Tensor], Tensor] | None = None,
                 config: TrainConfig | None = None, checkpoint: str | Path | None = None,
                 resume: bool = True, reporters: Sequence[Reporter] = (),
                 metadata: Mapping[str, Any] | None = None, fingerprint: Mapping[str, Any] | None = None,
                 log_path: str | Path | None = None, progress: bool = False):
        self.model = model
        self.weights = dict(weights)
        device = next(model.parameters()).device  # CPU or CUDA: the data follow the model
        self.data = {k: v.to(device) for k, v in (data or {}).items()}
        self.val_data = {k: v.to(device) for k, v in (val_data or {}).items()}
        self.reduced_energy = reduced_energy
        self.config = config or TrainConfig()
        self.metadata = dict(metadata or {})
        if any(k in self.weights for k in ("nll", "force", "bi_lipschitz")) and "x" not in self.data:
            raise FlowforceError("the 'nll', 'force' and 'bi_lipschitz' losses need training data (data={'x': ...})")
        if "x" in self.data:
            n = len(self.data["x"])
            for key, value in self.data.items():
                if len(value) != n:
                    raise FlowforceError(f"data[{key!r}] has {len(value)} rows but data['x'] has {n}")
        cfg = self.config
        if world()[1] > 1 and "reverse_kl" in self.weights:
            raise FlowforceError("the reverse_kl loss draws its own samples and is not data parallel; train it in one "
                                 "process (without torchrun)")
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = cosine_schedule(self.optimizer, cfg.steps, cfg.lr_final_factor)
        self.batch_rng = torch.Generator().manual_seed(cfg.seed)
        self._loss = data_parallel(model, self._loss_of)
        self.engine = Engine(
            model, self.train_step, cfg.steps, optimizer=self.optimizer, scheduler=self.scheduler,
            checkpoint=checkpoint, checkpoint_every=cfg.checkpoint_every, fmt=CHECKPOINT_FORMAT,
            payload=lambda: {"format": CHECKPOINT_FORMAT, "config": asdict(cfg), "metadata": self.metadata},
            fingerprint=fingerprint, generators={"batch": self.batch_rng},
            validate=self.validation_nll if "x" in self.val_data else None, validate_every=cfg.validate_every,
            patience=cfg.patience, reporters=reporters, log_path=log_path, progress="train" if progress else None,
            seed=cfg.seed)
        if resume:
            self.engine.resume()

    # -- what the engine keeps -------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.engine.step

    @property
    def best_val(self) -> float:
        return self.engine.best_val

    @property
    def best_state(self) -> dict[str, Tensor] | None:
        return self.engine.best_state

    @property
    def stopped_early(self) -> bool:
        return self.engine.stopped_early

    def save(self) -> None:
        self.engine.save()

    # -- one step --------------------------------------------------------------------------
    def _batch(self) -> dict[str, Tensor]:
        if "x" not in self.data:
            return {}
        idx = shard(torch.randint(len(self.data["x"]), (self.config.batch_size,), generator=self.batch_rng))
        return {k: v[idx] for k, v in self.data.items()}

    def _loss_of(self, model: torch.nn.Module, x: Tensor | None, forces: Tensor | None) -> tuple[Tensor, dict]:
        return weighted_loss(model, self.weights, x=x, reduced_forces=forces, reduced_energy=self.reduced_energy,
                             n_samples=self.config.n_samples or self.config.batch_size)

    @torch.no_grad()
    def validation_nll(self, chunk: int = 4096) -> float:
        x = self.val_data["x"]
        total = sum(float(nll_on_data(self.model, x[i:i + chunk])) * len(x[i:i + chunk])
                    for i in range(0, len(x), chunk))
        return total / len(x)

    def train_step(self) -> dict[str, float]:
        """One optimiser step on one batch (the engine counts it and steps the schedule)."""
        batch = self._batch()  # in a distributed run: this process's shard, gradients averaged over all
        loss, terms = self._loss(batch.get("x"), batch.get("forces"))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {float(loss)} at step {self.step + 1} (terms {terms}); "
                                     "lower the learning rate or check the data for outliers")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        return terms

    def run(self) -> TrainState:
        """Train until ``config.steps`` or early stopping (see :meth:`Engine.run`); returns the
        last state. If validation ran, the model ends with the parameters of the best
        validation NLL."""
        terms = self.engine.run()
        best = self.best_val
        return TrainState(self.step, self.config.steps, dict(terms), self.optimizer.param_groups[0]["lr"],
                          self.engine.elapsed_s, None, best if best < float("inf") else None, self.model)
