"""Reporters for training loops (the trainer, CG training, samplers): declare when they
report, then receive one shared state.

Like OpenMM's reporters, a reporter says how many steps remain until its next report
(:meth:`Reporter.steps_until_next`) and whether it needs validation at that step; the
trainer computes what is needed once and hands every due reporter the same
:class:`TrainState`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import FlowforceError


@dataclass
class TrainState:
    """What a reporter sees: the step just finished and its numbers."""

    step: int
    total_steps: int
    losses: dict[str, float]
    lr: float
    elapsed_s: float
    val_nll: float | None = None
    best_val_nll: float | None = None
    model: torch.nn.Module | None = field(default=None, repr=False)


class Reporter:
    """Base reporter: reports every ``interval`` steps."""

    needs_validation = False

    def __init__(self, interval: int = 1):
        if interval < 1:
            raise FlowforceError(f"reporter interval must be at least 1 step, got {interval}")
        self.interval = interval

    def steps_until_next(self, step: int) -> int:
        return self.interval - step % self.interval

    def report(self, state: TrainState) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class JSONLinesReporter(Reporter):
    """Appends one JSON object per report to a metrics log (step, losses, lr, val_nll, time).

    On resume, entries after the resumed step (written after the last checkpoint) are
    dropped first, so the log matches the checkpoint exactly; so is a last line torn by a
    killed run (it is not JSON).
    """

    def __init__(self, path: str | os.PathLike, interval: int = 10, resume_step: int | None = None):
        super().__init__(interval)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text(errors="replace").splitlines()
                    if _step_of(line) is not None and _step_of(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            self.path.write_text("")
        self._fh = open(self.path, "a")

    def row(self, state: TrainState) -> dict[str, Any]:
        """The JSON object logged for ``state`` (subclasses add their counters)."""
        row: dict[str, Any] = {"step": state.step, "lr": state.lr, "elapsed_s": round(state.elapsed_s, 3)}
        row.update({f"loss_{k}": v for k, v in state.losses.items()})
        if state.val_nll is not None:
            row["val_nll"] = state.val_nll
        return row

    def report(self, state: TrainState) -> None:
        row = self.row(state)
        self._fh.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                   for k, v in row.items()}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _step_of(line: str) -> int | None:
    """The step of a log line, None for a blank or torn line."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return int(row.get("step", 0)) if isinstance(row, dict) else None


class ProgressReporter(Reporter):
    """A tqdm progress bar showing the losses and the validation NLL."""

    def __init__(self, total_steps: int, initial: int = 0, interval: int = 10, desc: str = "train"):
        super().__init__(interval)
        from tqdm.auto import tqdm
        self._bar = tqdm(total=total_steps, initial=initial, desc=desc, dynamic_ncols=True)
        self._last = initial
        self._val: float | None = None

    def report(self, state: TrainState) -> None:
        self._bar.update(state.step - self._last)
        self._last = state.step
        if state.val_nll is not None:
            self._val = state.val_nll
        post = {k: f"{v:.4g}" for k, v in state.losses.items()}
        if self._val is not None:
            post["val_nll"] = f"{self._val:.4g}"
        self._bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        self._bar.close()
