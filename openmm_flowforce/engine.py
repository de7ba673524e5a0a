"""The one training loop every trainer runs on (``flowforce train``, ``cg``, ``sampler train``).

A method supplies only its step function (one optimisation step, returning its metrics) and
the objects whose state it keeps between steps; :class:`Engine` owns the rest:

* the optimizer and the learning-rate schedule (:func:`cosine_schedule`);
* validation every ``validate_every`` steps, early stopping after ``patience`` validations
  without improvement, and the best-validation parameters at the end;
* reporters: a progress bar, a JSON-lines metrics log, and any others passed in;
* checkpoints, written atomically every ``checkpoint_every`` steps, at the end, and when
  SIGINT (Ctrl-C) or SIGTERM arrives — always **at a step boundary**: the signal only sets a
  flag, the step in flight finishes, the checkpoint is written, then ``KeyboardInterrupt``
  is raised for the command's one exit path. A second signal interrupts at once (the last
  checkpoint stays as it was);
* exact resume: parameters, optimizer, schedule, the RNG streams of torch, numpy and
  Python plus the method's own generators, its state (replay buffers, counters such as
  energy evaluations), the step and the elapsed time. A run interrupted and rerun gives the
  parameters of an uninterrupted run, bit for bit on CPU;
* a fingerprint of what the checkpoint was trained from (:func:`fingerprint`: a hash of the
  training data, the options that shape the model, the package version). A rerun whose
  fingerprint differs is refused with a message that names what differs and offers
  ``--restart`` (:func:`restart`: start over, keeping the old file as ``NAME.prev``).

It lives at the package's root, beside :mod:`~openmm_flowforce.reporters`, and imports only
``io``, ``reporters`` and ``errors``: the trainers in ``training/`` and the samplers'
training loops in ``samplers/`` use it alike, and samplers sit below ``training``.

Several processes (``torchrun``, :func:`init_distributed`): every process runs the same
engine on the same global batches, each computing the loss on its shard (:func:`shard`)
through DistributedDataParallel (:func:`data_parallel`), which averages the gradients; only
rank 0 writes checkpoints and logs, a stop request on any rank stops all at the same step,
and a checkpoint resumes with any number of processes.

Checkpoint layout: the method's ``payload()`` (``format``, ``metadata``, ...) plus ``model``
(the state dict) and ``engine`` (everything above, for resuming); loaders of trained models
read only ``model`` and ``metadata``.
"""
from __future__ import annotations

import copy
import hashlib
import math
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import torch

from ._version import __version__
from .errors import BadFileError, FlowforceError
from .io import RESUME_FIX, load_checkpoint, save_checkpoint
from .reporters import JSONLinesReporter, ProgressReporter, Reporter, TrainState

__all__ = ["Engine", "Stateful", "StateOf", "cosine_schedule", "data_hash", "data_parallel", "fingerprint",
           "fingerprint_differences", "init_distributed", "restart", "shard", "world"]


class Stateful(Protocol):
    """Anything whose state a checkpoint keeps: ``state_dict()`` / ``load_state_dict(state)``."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


class StateOf:
    """A :class:`Stateful` from two functions (for plain counters kept in a method's attributes)."""

    def __init__(self, get: Callable[[], Any], set: Callable[[Any], None]):
        self._get, self._set = get, set

    def state_dict(self) -> Any:
        return self._get()

    def load_state_dict(self, state: Any) -> None:
        self._set(state)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int,
                    final_factor: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay of the learning rate from ``lr`` to ``lr·final_factor`` over ``total_steps``
    (constant after). The factor at step s is ``f + (1 − f)·½(1 + cos(π·min(s, S)/S))``."""
    steps = max(1, int(total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


# -- fingerprints -------------------------------------------------------------------------------
def data_hash(*arrays: Any) -> str:
    """SHA-256 (hex, first 16 digits) of the bytes, shapes and dtypes of ``arrays`` (numpy,
    torch, numbers or None): the identity of a training set, independent of its file name."""
    digest = hashlib.sha256()
    for array in arrays:
        if array is None:
            digest.update(b"none")
            continue
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        array = np.ascontiguousarray(np.asarray(array))
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()[:16]


def fingerprint(data: str | None, options: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint was trained from: ``data`` (:func:`data_hash` or a target's name),
    ``options`` (those that shape the model or the run, plain values) and the version."""
    return {"data": data, "options": _plain(dict(options)), "version": __version__}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def fingerprint_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences, e.g. ``["other training data (their content differs)",
    "different options: flow.transform ('smooth' → 'spline')"]``."""
    out = []
    if saved.get("data") != current.get("data"):
        out.append("other training data (their content differs)")
    old, new = _flat(saved.get("options", {})), _flat(current.get("options", {}))
    changed = [f"{key} ({old.get(key, 'unset')!r} → {new.get(key, 'unset')!r})"
               for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    if changed:
        out.append("different options: " + ", ".join(changed))
    if saved.get("version") != current.get("version"):
        out.append(f"another flowforce version ({saved.get('version')} → {current.get('version')})")
    return out


def _flat(options: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def restart(*paths: str | os.PathLike) -> list[Path]:
    """Start over: move each existing ``NAME`` to ``NAME.prev`` (replacing an older ``.prev``);
    returns the files moved."""
    moved = []
    for path in paths:
        path = Path(path)
        if path.exists():
            prev = path.with_name(path.name + ".prev")
            os.replace(path, prev)
            moved.append(prev)
    return moved


# -- signals ------------------------------------------------------------------------------------
class _StopOnSignal:
    """While active (main thread only), SIGINT and SIGTERM set :attr:`requested` instead of
    interrupting; a second signal raises ``KeyboardInterrupt`` at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, number: int, frame: Any) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(number).name

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._old[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for number, handler in self._old.items():
            signal.signal(number, handler)
        self._old.clear()


def _rng_state(generators: Mapping[str, torch.Generator]) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": _python_state(),
             "generators": {name: g.get_state() for name, g in generators.items()}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _python_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _restore_global_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_global_rng(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class _ForkedRng:
    """The global RNG streams of torch (CPU and CUDA), numpy and Python as they were before, after
    the block: what the training draws inside does not leak into the caller's streams."""

    def __enter__(self) -> "_ForkedRng":
        self._saved = _rng_state({})
        return self

    def __exit__(self, *exc: Any) -> None:
        _restore_global_rng(self._saved)


# -- the loop -----------------------------------------------------------------------------------
class Engine:
    """Runs a method's step function to ``total_steps`` with checkpoints and exact resume.

    Args:
        model: the module trained (its state dict is the checkpoint's ``model``).
        step: one optimisation step; returns its metrics (``{name: float}``), which reporters see.
        total_steps: a resumed run continues to this number.
        optimizer: saved and restored; ``scheduler`` (optional) too, stepped after every step.
        checkpoint: file written atomically (None: no checkpoints, no resume).
        checkpoint_every: steps between checkpoints (0: only at the end and on a signal).
        payload: what the method adds to every checkpoint (``format``, ``metadata``, ...).
        fingerprint: :func:`fingerprint` of this run; a checkpoint with another one is refused.
        state: the method's other state by name (buffers, counters: :class:`StateOf`).
        generators: the method's own ``torch.Generator`` s by name.
        validate: validation loss of the current model (lower is better); with
            ``validate_every`` > 0 it runs every so many steps and at the last step, keeps the
            best parameters, stops after ``patience`` (> 0) validations without improvement.
        reporters: reporters that see every step's :class:`TrainState`.
        log_path: JSON-lines metrics log every ``log_every`` steps, with ``log_extra()``'s
            counters; rows after the resumed step are dropped on resume.
        progress: a progress bar with this label (None: none).
        fmt: the ``format`` tag checkpoints must have to be resumed from; ``check``: further
            checks of a checkpoint before resuming (raise :class:`FlowforceError`).
        seed: a fresh run seeds the global RNG streams of torch, numpy and Python with it, inside
            :meth:`run` only: the caller's streams are the same before and after (no library
            function seeds the global RNG); a resumed run continues the saved streams.
    """

    def __init__(self, model: torch.nn.Module, step: Callable[[], Mapping[str, float]], total_steps: int, *,
                 optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                 checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 0,
                 payload: Callable[[], Mapping[str, Any]] | None = None, fingerprint: Mapping[str, Any] | None = None,
                 state: Mapping[str, Stateful] | None = None, generators: Mapping[str, torch.Generator] | None = None,
                 validate: Callable[[], float] | None = None, validate_every: int = 0, patience: int = 0,
                 reporters: Sequence[Reporter] = (),
                 log_path: str | os.PathLike | None = None, log_every: int = 10,
                 log_extra: Callable[[], Mapping[str, Any]] | None = None, progress: str | None = None,
                 fmt: str | None = None, check: Callable[[dict[str, Any]], None] | None = None, seed: int = 0):
        self.model, self.step_fn, self.total_steps = model, step, int(total_steps)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.checkpoint_every = int(checkpoint_every)
        self.payload = payload or dict
        self.fingerprint = dict(fingerprint) if fingerprint is not None else None
        self.state = dict(state or {})
        self.generators = dict(generators or {})
        self.validate, self.validate_every, self.patience = validate, int(validate_every), int(patience)
        self.reporters = list(reporters)
        self.log_path, self.log_every, self.log_extra = log_path, int(log_every), log_extra
        self.progress = progress
        self.fmt, self.check = fmt, check
        self.seed = int(seed)
        self._rng: dict[str, Any] | None = None  # the training's global streams between runs (None: seed)
        self._running = False
        self.step = 0
        self.elapsed_s = 0.0
        self.best_val = math.inf
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_validations = 0
        self.stopped_early = False
        self.metrics: dict[str, float] = {}
        self.resumed_from: int | None = None
        self._started: float | None = None
        self._stop = _StopOnSignal()

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        rng = _rng_state(self.generators)  # inside run(): the training's own streams
        if not self._running:
            rng.update({k: v for k, v in (self._rng or self._seeded()).items() if k != "generators"})
        engine = {"step": self.step, "elapsed_s": self.elapsed(), "rng": rng,
                  "state": {name: obj.state_dict() for name, obj in self.state.items()},
                  "best_val": self.best_val, "best_model": self.best_state, "bad_validations": self.bad_validations,
                  "stopped_early": self.stopped_early, "metrics": dict(self.metrics), "fingerprint": self.fingerprint}
        if self.optimizer is not None:
            engine["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None:
            engine["scheduler"] = self.scheduler.state_dict()
        return {**self.payload(), "step": self.step, "model": self.model.state_dict(), "engine": engine}

    def save(self) -> None:
        """Write the checkpoint atomically (no-op without one). Only rank 0 of a distributed run writes."""
        if self.checkpoint is not None and _is_writer():
            save_checkpoint(self.state_dict(), self.checkpoint)

    def resume(self) -> dict[str, Any] | None:
        """Restore everything from the checkpoint if it exists; returns it (None: a fresh run).

        Raises:
            BadFileError: unreadable, of another kind, or without resume state.
            FlowforceError: trained from other data or options (names what differs).
        """
        if self.checkpoint is None or not self.checkpoint.exists():
            return None
        ckpt = load_checkpoint(self.checkpoint, self.fmt, fix=RESUME_FIX)
        if "engine" not in ckpt:
            raise BadFileError(f"{self.checkpoint} holds no training state to resume from (a finished model file "
                               f"or one written by an older flowforce); {RESUME_FIX}")
        if self.check is not None:
            self.check(ckpt)
        engine = ckpt["engine"]
        saved = engine.get("fingerprint")
        if self.fingerprint is not None and saved is not None:
            differences = fingerprint_differences(saved, self.fingerprint)
            if differences:
                raise FlowforceError(f"cannot resume {self.checkpoint}: it was trained from other inputs or with "
                                     f"other options than this run ({'; '.join(differences)}); {RESUME_FIX}")
        try:
            self.model.load_state_dict(ckpt["model"])
            if self.optimizer is not None:
                self.optimizer.load_state_dict(engine["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(engine["scheduler"])
        except (RuntimeError, ValueError, KeyError) as error:  # shapes of another architecture
            first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise BadFileError(f"cannot resume from {self.checkpoint}: it holds a model with other options than "
                               f"these ({first}); {RESUME_FIX}") from None
        for name, obj in self.state.items():
            obj.load_state_dict(engine["state"][name])
        self._rng = engine["rng"]  # the global streams: restored inside run()
        for name, generator in self.generators.items():
            generator.set_state(engine["rng"]["generators"][name])
        self.step, self.elapsed_s = int(engine["step"]), float(engine["elapsed_s"])
        self.best_val, self.best_state = float(engine["best_val"]), engine["best_model"]
        self.bad_validations, self.stopped_early = int(engine["bad_validations"]), bool(engine["stopped_early"])
        self.metrics = dict(engine.get("metrics", {}))
        self.resumed_from = self.step
        return ckpt

    def _seeded(self) -> dict[str, Any]:
        with _ForkedRng():
            _seed_global_rng(self.seed)
            return _rng_state({})

    def elapsed(self) -> float:
        """Seconds of training so far, over all runs of this checkpoint."""
        return self.elapsed_s + (time.perf_counter() - self._started if self._started is not None else 0.0)

    # -- validation -------------------------------------------------------------------------
    def _validation(self) -> float:
        assert self.validate is not None
        val = float(self.validate())
        if val < self.best_val:
            self.best_val, self.bad_validations = val, 0
            self.best_state = copy.deepcopy(self.model.state_dict())
        else:
            self.bad_validations += 1
            if self.patience and self.bad_validations >= self.patience:
                self.stopped_early = True
        return val

    @property
    def validating(self) -> bool:
        return self.validate is not None and self.validate_every > 0

    # -- the loop ---------------------------------------------------------------------------
    def _reporters(self) -> list[Reporter]:
        reporters = list(self.reporters)
        if self.log_path is not None and _is_writer():
            reporters.append(_LogReporter(self.log_path, self.log_extra, self.log_every, self.resumed_from))
        if self.progress is not None and _is_writer():
            reporters.append(ProgressReporter(self.total_steps, initial=min(self.step, self.total_steps),
                                              interval=self.log_every, desc=self.progress))
        return reporters

    def after_step(self) -> None:
        """Called after every finished step (a hook for tests and subclasses)."""

    def run(self) -> dict[str, float]:
        """Train to ``total_steps`` (or early stopping); returns the last step's metrics.

        Raises:
            KeyboardInterrupt: after SIGINT/SIGTERM, once the checkpoint of the last finished
                step is written.
        """
        reporters = self._reporters()
        self._started = time.perf_counter()
        forked = _ForkedRng().__enter__()
        if self._rng is None:
            _seed_global_rng(self.seed)
        else:
            _restore_global_rng(self._rng)
        self._running = True
        try:
            with self._stop:
                while self.step < self.total_steps and not self.stopped_early:
                    self.model.train()
                    self.metrics = dict(self.step_fn())
                    if self.scheduler is not None:
                        self.scheduler.step()
                    self.step += 1
                    last = self.step == self.total_steps
                    val = None
                    if self.validating and (self.step % self.validate_every == 0 or last):
                        val = self._validation()
                    lr = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else math.nan
                    state = TrainState(self.step, self.total_steps, self.metrics, lr, self.elapsed(), val,
                                       self.best_val if math.isfinite(self.best_val) else None, self.model)
                    for reporter in reporters:
                        if self.step % reporter.interval == 0 or last or self.stopped_early:
                            reporter.report(state)
                    self.after_step()
                    if _any_rank(self._stop.requested is not None):
                        self.save()
                        raise KeyboardInterrupt(self._stop.requested or "another process was interrupted")
                    if self.checkpoint_every and self.step % self.checkpoint_every == 0 and not last:
                        self.save()
        finally:
            self._rng, self._running = _rng_state({}), False
            forked.__exit__(None, None, None)
            for reporter in reporters:
                reporter.close()
            self.elapsed_s, self._started = self.elapsed(), None
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.model.eval()
        self.save()
        return self.metrics


class _LogReporter(JSONLinesReporter):
    """The metrics log: losses as ``loss_*``, the validation loss, and the method's counters."""

    def __init__(self, path: str | os.PathLike, extra: Callable[[], Mapping[str, Any]] | None, interval: int,
                 resume_step: int | None):
        super().__init__(path, interval=interval, resume_step=resume_step)
        self._extra = extra

    def row(self, state: TrainState) -> dict[str, Any]:
        row = super().row(state)
        if self._extra is not None:
            row.update(self._extra())
        return row


# -- torch.distributed ---------------------------------------------------------------------------
def world() -> tuple[int, int]:
    """``(rank, number of processes)``: ``(0, 1)`` outside a distributed run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _is_writer() -> bool:
    """Rank 0 of a distributed run, or a single process."""
    return world()[0] == 0


def init_distributed(use_cuda: bool = True) -> torch.device | None:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1): NCCL with one GPU
    per process (``LOCAL_RANK``) where CUDA works and ``use_cuda``, gloo on CPU. Returns the
    device this process trains on, or None outside torchrun (nothing is initialised)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    use_cuda = use_cuda and torch.cuda.is_available()
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")


class _LossModule(torch.nn.Module):
    """``loss(model, *batch)`` as a module's ``forward``, so that DistributedDataParallel sees
    (and averages the gradients of) every call, whatever method of the model the loss uses."""

    def __init__(self, model: torch.nn.Module, loss: Callable[..., Any]):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, *batch: Any) -> Any:
        return self.loss(self.model, *batch)


def data_parallel(model: torch.nn.Module, loss: Callable[..., Any]) -> Callable[..., Any]:
    """``loss(model, *batch)`` for one process, or the same through DistributedDataParallel in
    a distributed run: each process then passes its shard of the global batch (:func:`shard`)
    and the gradients are averaged over processes, i.e. they are those of the global batch."""
    if world()[1] == 1:
        return lambda *batch: loss(model, *batch)
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    # find_unused_parameters: force matching differentiates the energy inside the loss
    # (autograd.grad, create_graph), which DDP's default bookkeeping takes for an unfinished
    # reduction; with it, DDP walks the graph and both losses train (checked with gloo).
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(_LossModule(model, loss), device_ids=device_ids, find_unused_parameters=True)


def shard(indices: torch.Tensor) -> torch.Tensor:
    """This process's contiguous share of a global batch of ``indices`` (all of it for one
    process). Every process draws the same global batch from the same generator, so a run
    gives the same result with any number of processes, up to the order of the reductions."""
    rank, size = world()
    if size == 1:
        return indices
    if len(indices) % size:
        raise FlowforceError(f"the batch size {len(indices)} must be a multiple of the number of processes {size}")
    return indices.reshape(size, -1)[rank]


def _any_rank(flag: bool) -> bool:
    """``flag`` of any process (a stop request must stop all of them at the same step)."""
    rank, size = world()
    if size == 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)
