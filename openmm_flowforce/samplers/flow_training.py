"""What the flow-based sampler methods (reverse KL, FAB) share.

* :class:`EnergyCounter`: the target's reduced energy, counting every configuration it
  is evaluated at (with or without a gradient: a forward and its backward count once).
* :func:`flow_presets`: per-target flow and training defaults, scaled for a CPU.
* :class:`FlowSamplerMethod`: a :class:`~openmm_flowforce.samplers.registry.SamplerMethod`
  whose model is a :class:`~openmm_flowforce.flows.RealFlow` (float64) and whose
  training loop owns atomic checkpoints with exact resume, a tqdm progress bar and a
  JSON-lines metrics log; subclasses supply one training step.

Checkpoints follow :mod:`openmm_flowforce.samplers.common` (so ``load_sampler`` and the
CLI rebuild any method's model): ``format``, ``method``, ``target``, ``options`` (resolved),
``model``, ``summary`` (``steps``, ``energy_evaluations``, ``wall_time_s``, ``final_loss``)
and ``state`` (optimizer, torch RNG, the method's ``extra`` state: FAB's buffer and HMC
step sizes). A run whose checkpoint exists resumes from it; only ``steps``,
``checkpoint_every`` and ``log_every`` may change on resume.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from ..flows import RealFlow
from ..io import RESUME_FIX, load_checkpoint, save_checkpoint
from ..reporters import ProgressReporter, TrainState
from .common import SAMPLER_CHECKPOINT_FORMAT, SamplerLogReporter, particle_shape, target_spec
from .registry import SamplerMethod
from ..errors import FlowforceError

Tensor = torch.Tensor

#: Options that may differ between a checkpoint and the run resuming it.
_RESUMABLE_CHANGES = ("steps", "checkpoint_every", "log_every")

#: Per-target defaults for options left at None. ``scale`` is the std of the initial
#: Gaussian (GMM-40's means are uniform in [−40, 40]², std ≈ 23; DW-4 and LJ positions
#: are O(1)); the networks are small enough for a few thousand CPU steps. ``energy_cut``
#: (reverse KL only; absent: no cut) tames the r⁻¹² overlaps of an untrained LJ flow's
#: samples, whose energies reach 10¹⁵ (see :func:`regularised_energy`).
_PRESETS: dict[str, dict[str, Any]] = {
    "gmm40": dict(scale=25.0, n_layers=8, hidden=64, n_components=16, step_size=1.0),
    "dw4": dict(scale=2.0, n_layers=8, hidden=64, n_components=8, step_size=0.3),
    "lj13": dict(scale=1.0, n_layers=8, hidden=128, n_components=8, step_size=0.02, energy_cut=100.0),
    "lj55": dict(scale=1.5, n_layers=8, hidden=256, n_components=8, step_size=0.01, energy_cut=100.0),
    "default": dict(scale=1.0, n_layers=8, hidden=64, n_components=8, step_size=0.1),
}

#: Options every flow sampler method has (values of None come from the target's preset).
COMMON_DEFAULTS: dict[str, Any] = dict(
    scale=None, n_layers=None, hidden=None, n_components=None, transform="smooth", mean_free=True,
    steps=1000, batch_size=128, lr=1e-3, grad_clip=100.0, seed=0, checkpoint_every=100, log_every=10,
)


def target_key(target: Any) -> str:
    """``"gmm40"``, ``"dw4"``, ``"lj13"``, ``"lj55"`` or ``"default"`` for a toy target object."""
    from ..targets.toys import GaussianMixture40, LennardJonesCluster, MultiDoubleWell

    if isinstance(target, GaussianMixture40):
        return "gmm40"
    if isinstance(target, MultiDoubleWell) and target.n_particles == 4 and target.spatial_dim == 2:
        return "dw4"
    if isinstance(target, LennardJonesCluster) and target.spatial_dim == 3 and target.n_particles in (13, 55):
        return f"lj{target.n_particles}"
    return "default"


def flow_presets(target: Any) -> dict[str, Any]:
    """The preset values for ``target`` (see ``_PRESETS``)."""
    return dict(_PRESETS[target_key(target)])


#: Options that must be positive integers wherever a method has them.
_POSITIVE_INTS = ("n_layers", "n_components", "steps", "batch_size", "checkpoint_every", "log_every", "n_leapfrog",
                  "buffer_size", "min_buffer", "n_updates")


def resolve_options(options: Mapping[str, Any], target: Any) -> dict[str, Any]:
    """Options with every None replaced by the target's preset value (where it has one).

    Raises:
        ValueError: an integer option that is not a positive integer, or a non-positive
            ``scale``/``lr``/``step_size``.
    """
    preset = flow_presets(target)
    opts = {k: (preset[k] if v is None and k in preset else v) for k, v in options.items()}
    for key in _POSITIVE_INTS:
        if key in opts and (isinstance(opts[key], bool) or not isinstance(opts[key], int) or opts[key] < 1):
            raise FlowforceError(f"option {key} must be a positive integer, got {opts[key]!r}")
    for key in ("scale", "lr", "step_size"):
        if key in opts and not (isinstance(opts[key], (int, float)) and opts[key] > 0):
            raise FlowforceError(f"option {key} must be a positive number, got {opts[key]!r}")
    cut = opts.get("energy_cut")
    if cut is not None and (isinstance(cut, bool) or not isinstance(cut, (int, float)) or not math.isfinite(cut)):
        raise FlowforceError(f"option energy_cut must be a finite number of kT or None, got {cut!r}")
    return opts


class EnergyCounter:
    """Reduced energy ``u(x) (B,)`` of a target that counts evaluated configurations."""

    def __init__(self, target: Any, count: int = 0):
        self.target = target
        self.count = int(count)

    def __call__(self, x: Tensor) -> Tensor:
        self.count += int(x.shape[0])
        return self.target.energy(x)


class _Recorder:
    """A density model that remembers the log q of the last ``sample_and_log_prob``."""

    def __init__(self, model: RealFlow):
        self.model = model
        self.log_q: Tensor | None = None

    def log_prob(self, x: Tensor) -> Tensor:
        return self.model.log_prob(x)

    def sample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        x, log_q = self.model.sample_and_log_prob(n)
        self.log_q = log_q.detach()
        return x, log_q


class TrainContext:
    """What a training step sees: model, counted energy, optimizer, options, method state."""

    def __init__(self, model: RealFlow, energy: EnergyCounter, optimizer: torch.optim.Optimizer,
                 options: Mapping[str, Any], extra: dict[str, Any]):
        self.model, self.energy, self.optimizer, self.options, self.extra = model, energy, optimizer, options, extra

    def optimizer_step(self, loss: Tensor) -> bool:
        """Backward, clip, step; a non-finite loss or gradient skips the update (returns False)."""
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            return False
        loss.backward()
        clip = float(self.options["grad_clip"])
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else math.inf)
        if not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self.optimizer.step()
        return True


class FlowSamplerMethod(SamplerMethod):
    """A sampler method whose model is a :class:`RealFlow` trained from the energy alone.

    Subclasses set ``name`` and ``defaults`` (including :data:`COMMON_DEFAULTS`) and
    implement :meth:`train_step`, and, if they keep state between steps,
    :meth:`init_extra` / :meth:`extra_state` / :meth:`load_extra`.
    """

    # -- model -------------------------------------------------------------------------
    def build(self, target: Any, options: Mapping[str, Any]) -> RealFlow:
        """A float64 :class:`RealFlow` for ``target`` (mean free for particle targets
        unless ``mean_free`` is False), initialised from ``seed``."""
        opts = resolve_options(self.options(options), target)
        shape = particle_shape(target)
        particles = dict(n_particles=shape[0], spatial_dim=shape[1]) if opts["mean_free"] and shape else {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(opts["seed"]))
            return RealFlow(int(target.dim), scale=float(opts["scale"]), transform=opts["transform"],
                            n_layers=int(opts["n_layers"]), hidden=opts["hidden"],
                            n_components=int(opts["n_components"]), **particles).double()

    def sample(self, model: RealFlow, n: int) -> Tensor:
        """``(n, dim)`` flow samples (float64, mean free for particle flows)."""
        with torch.no_grad():
            return model.sample(int(n))

    def log_prob(self, model: RealFlow, x: Tensor) -> Tensor:
        """log q(x) ``(B,)``, normalised (on the zero-centre-of-mass hyperplane for particle flows)."""
        with torch.no_grad():
            return model.log_prob(x.to(dtype=torch.float64))

    # -- hooks -------------------------------------------------------------------------
    def init_extra(self, model: RealFlow, target: Any, options: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def extra_state(self, extra: dict[str, Any]) -> dict[str, Any]:
        return {}

    def load_extra(self, extra: dict[str, Any], state: dict[str, Any]) -> None:
        pass

    def train_step(self, ctx: TrainContext) -> dict[str, float]:
        raise NotImplementedError

    # -- the loop ----------------------------------------------------------------------
    def train(self, model: RealFlow, target: Any, options: Mapping[str, Any], checkpoint: str | Path,
              progress: bool = True, log_path: str | Path | None = None) -> dict[str, Any]:
        """Train ``model`` (from :meth:`build`) to ``options['steps']`` steps.

        Resumes from ``checkpoint`` when it exists (same method and options up to
        ``steps``, ``checkpoint_every``, ``log_every``): parameters, optimizer, torch RNG,
        counters and method state are restored, so an interrupted and resumed run equals
        an uninterrupted one. Writes the checkpoint atomically every ``checkpoint_every``
        steps, at the end and on Ctrl-C. The metrics log (JSON lines) gets a row every
        ``log_every`` steps when ``log_path`` is given.

        Returns:
            ``steps``, ``energy_evaluations``, ``wall_time_s``, ``final_loss``,
            ``resumed_from`` and the last step's metrics.
        """
        opts = resolve_options(self.options(options), target)
        checkpoint = Path(checkpoint)
        optimizer = torch.optim.Adam(model.parameters(), lr=float(opts["lr"]))
        energy = EnergyCounter(target)
        extra = self.init_extra(model, target, opts)
        step, wall, resumed_from = 0, 0.0, None
        if checkpoint.exists():
            ckpt = load_checkpoint(checkpoint, expected_format=SAMPLER_CHECKPOINT_FORMAT, fix=RESUME_FIX)
            if ckpt.get("method") != self.name:
                raise FlowforceError(f"{checkpoint} is a {ckpt.get('method')!r} checkpoint, not {self.name!r}")
            changed = sorted(k for k, v in ckpt["options"].items()
                             if k not in _RESUMABLE_CHANGES and opts.get(k) != v)
            if changed:
                raise FlowforceError(f"cannot resume {checkpoint} with different options: {', '.join(changed)} (only "
                                     f"{', '.join(_RESUMABLE_CHANGES)} may change); use another checkpoint path")
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["state"]["optimizer"])
            self.load_extra(extra, ckpt["state"]["extra"])
            torch.set_rng_state(ckpt["state"]["rng_torch"])
            summary = ckpt["summary"]
            step, energy.count = int(summary["steps"]), int(summary["energy_evaluations"])
            wall = float(summary["wall_time_s"])
            resumed_from = step
        else:
            torch.manual_seed(int(opts["seed"]))
        ctx = TrainContext(model, energy, optimizer, opts, extra)
        total, every = int(opts["steps"]), int(opts["log_every"])
        metrics: dict[str, float] = {}
        reporters = []
        if log_path is not None:
            reporters.append(SamplerLogReporter(log_path, lambda: {"energy_evaluations": energy.count, **metrics},
                                                interval=every, resume_step=resumed_from))
        if progress:
            reporters.append(ProgressReporter(total, initial=min(step, total), interval=every, desc=self.name))
        start = time.perf_counter() - wall

        def summary() -> dict[str, Any]:
            return {"steps": step, "energy_evaluations": energy.count, "wall_time_s": time.perf_counter() - start,
                    "final_loss": metrics.get("loss", math.nan)}

        def save() -> None:
            save_checkpoint({"format": SAMPLER_CHECKPOINT_FORMAT, "method": self.name, "target": target_spec(target),
                             "options": dict(opts), "model": model.state_dict(), "summary": summary(),
                             "state": {"optimizer": optimizer.state_dict(), "rng_torch": torch.get_rng_state(),
                                       "extra": self.extra_state(extra)}}, checkpoint)

        try:
            model.train()
            while step < total:
                metrics = self.train_step(ctx)
                step += 1
                if step % every == 0 or step == total:
                    state = TrainState(step, total, {self.name: metrics["loss"]}, float(opts["lr"]),
                                       time.perf_counter() - start)
                    for reporter in reporters:
                        reporter.report(state)
                if step % int(opts["checkpoint_every"]) == 0 and step < total:
                    save()
        except KeyboardInterrupt:
            save()
            raise
        finally:
            for reporter in reporters:
                reporter.close()
        model.eval()
        save()
        return {**summary(), "resumed_from": resumed_from, **metrics}
