"""Trainer: Adam with a cosine schedule, validation NLL, early stopping, atomic
checkpoints with exact resume, seeds, progress and a metrics log."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..io import CHECKPOINT_FORMAT, RESUME_FIX, load_checkpoint, save_checkpoint
from .losses import nll_on_data, weighted_loss
from ..reporters import Reporter, TrainState
from ..errors import BadFileError, FlowforceError
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


#: What a checkpoint needs for :class:`Trainer` to resume from it.
RESUME_KEYS = ("model", "optimizer", "scheduler", "rng_torch", "rng_batch", "step", "best_val", "best_model",
               "bad_validations", "stopped_early")


class Trainer:
    """Fits a density model by a weighted sum of named losses.

    Args:
        model: an ``nn.Module`` with ``log_prob`` and ``sample_and_log_prob``.
        weights: loss weights by name (``nll``, ``force``, ``reverse_kl``).
        data: training tensors; ``"x"`` (N, ...) and optionally ``"forces"`` (N, ...) in
            reduced units (÷ kT). May be omitted for pure reverse-KL training.
        val_data: validation ``"x"`` for the validation NLL and early stopping.
        reduced_energy: u(x) = E(x)/kT for the reverse-KL term.
        config: :class:`TrainConfig`.
        checkpoint: path of the checkpoint; if it exists and ``resume`` is set, training
            continues exactly where it stopped.
        reporters: extra :class:`Reporter` s.
        metadata: plain data stored with every checkpoint (how to rebuild the model).
    """

    def __init__(self, model: torch.nn.Module, weights: Mapping[str, float],
                 data: Mapping[str, Tensor] | None = None, val_data: Mapping[str, Tensor] | None = None,
                 reduced_energy: Callable[[Tensor], Tensor] | None = None,
                 config: TrainConfig | None = None, checkpoint: str | Path | None = None,
                 resume: bool = True, reporters: Sequence[Reporter] = (),
                 metadata: Mapping[str, Any] | None = None):
        self.model = model
        self.weights = dict(weights)
        device = next(model.parameters()).device  # CPU or CUDA: the data follow the model
        self.data = {k: v.to(device) for k, v in (data or {}).items()}
        self.val_data = {k: v.to(device) for k, v in (val_data or {}).items()}
        self.reduced_energy = reduced_energy
        self.config = config or TrainConfig()
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.reporters = list(reporters)
        self.metadata = dict(metadata or {})
        if any(k in self.weights for k in ("nll", "force")) and "x" not in self.data:
            raise FlowforceError("the 'nll' and 'force' losses need training data (data={'x': ...})")
        if "x" in self.data:
            n = len(self.data["x"])
            for key, value in self.data.items():
                if len(value) != n:
                    raise FlowforceError(f"data[{key!r}] has {len(value)} rows but data['x'] has {n}")
        torch.manual_seed(self.config.seed)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=self.config.lr,
                                          weight_decay=self.config.weight_decay)
        final = self.config.lr_final_factor
        steps = self.config.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        self.batch_rng = torch.Generator().manual_seed(self.config.seed)
        self.step = 0
        self.best_val = math.inf
        self.best_state: dict[str, Tensor] | None = None
        self.bad_validations = 0
        self.stopped_early = False
        if resume and self.checkpoint is not None and self.checkpoint.exists():
            self._restore(load_checkpoint(self.checkpoint, CHECKPOINT_FORMAT, required=RESUME_KEYS, fix=RESUME_FIX))

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "step": self.step, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng_torch": torch.get_rng_state(), "rng_batch": self.batch_rng.get_state(),
                "best_val": self.best_val, "best_model": self.best_state, "bad_validations": self.bad_validations,
                "stopped_early": self.stopped_early, "config": asdict(self.config), "metadata": self.metadata}

    def save(self) -> None:
        if self.checkpoint is not None:
            save_checkpoint(self.state_dict(), self.checkpoint)

    def _restore(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as error:  # shapes of another architecture
            first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise BadFileError(f"cannot resume from {self.checkpoint}: it holds a model with other options than "
                               f"these ({first}); {RESUME_FIX}") from None
        torch.set_rng_state(state["rng_torch"])
        self.batch_rng.set_state(state["rng_batch"])
        self.step = int(state["step"])
        self.best_val = float(state["best_val"])
        self.best_state = state["best_model"]
        self.bad_validations = int(state["bad_validations"])
        self.stopped_early = bool(state["stopped_early"])

    # -- the loop ------------------------------------------------------------------------
    def _batch(self) -> dict[str, Tensor]:
        if "x" not in self.data:
            return {}
        idx = torch.randint(len(self.data["x"]), (self.config.batch_size,), generator=self.batch_rng)
        return {k: v[idx] for k, v in self.data.items()}

    @torch.no_grad()
    def validation_nll(self, chunk: int = 4096) -> float:
        x = self.val_data["x"]
        total = sum(float(nll_on_data(self.model, x[i:i + chunk])) * len(x[i:i + chunk])
                    for i in range(0, len(x), chunk))
        return total / len(x)

    def _validate(self) -> float:
        val = self.validation_nll()
        if val < self.best_val:
            self.best_val, self.bad_validations = val, 0
            self.best_state = copy.deepcopy(self.model.state_dict())
        else:
            self.bad_validations += 1
            if self.config.patience and self.bad_validations >= self.config.patience:
                self.stopped_early = True
        return val

    def train_step(self) -> dict[str, float]:
        self.model.train()
        batch = self._batch()
        loss, terms = weighted_loss(self.model, self.weights, x=batch.get("x"),
                                    reduced_forces=batch.get("forces"), reduced_energy=self.reduced_energy,
                                    n_samples=self.config.n_samples or self.config.batch_size)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {float(loss)} at step {self.step + 1} (terms {terms}); "
                                     "lower the learning rate or check the data for outliers")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return terms

    def run(self) -> TrainState:
        """Train until ``config.steps`` or early stopping; returns the last state.

        A checkpoint is written every ``checkpoint_every`` steps, at the end, and when
        the run is interrupted (Ctrl-C), so no finished step is lost. If validation ran,
        the model ends with the parameters of the best validation NLL.
        """
        cfg = self.config
        validate = cfg.validate_every > 0 and "x" in self.val_data
        start = time.perf_counter()
        state = TrainState(self.step, cfg.steps, {}, self.optimizer.param_groups[0]["lr"], 0.0)
        try:
            while self.step < cfg.steps and not self.stopped_early:
                terms = self.train_step()
                last = self.step == cfg.steps
                val = self._validate() if validate and (self.step % cfg.validate_every == 0 or last) else None
                state = TrainState(self.step, cfg.steps, terms, self.optimizer.param_groups[0]["lr"],
                                   time.perf_counter() - start, val,
                                   self.best_val if math.isfinite(self.best_val) else None, self.model)
                for reporter in self.reporters:
                    if reporter.steps_until_next(self.step) == reporter.interval or last or self.stopped_early:
                        reporter.report(state)
                if self.step % cfg.checkpoint_every == 0 and not last:
                    self.save()
        except KeyboardInterrupt:
            self.save()
            raise
        finally:
            for reporter in self.reporters:
                reporter.close()
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.save()
        return state
