"""What the flow-based sampler methods (reverse KL, FAB) share.

* :class:`EnergyCounter`: the target's reduced energy, counting every configuration it
  is evaluated at (with or without a gradient: a forward and its backward count once).
* :func:`flow_presets`: per-target flow and training defaults, scaled for a CPU.
* :class:`FlowSamplerMethod`: a :class:`~openmm_flowforce.samplers.registry.SamplerMethod`
  whose model is a flow from :data:`FLOW_BUILDERS` (option ``flow``: ``"real"``, a
  :class:`~openmm_flowforce.flows.RealFlow`, ``"equivariant"``, an
  :class:`~openmm_flowforce.flows.equivariant.EquivariantAugmentedFlow` trained on the
  joint (x, a) against the extended target ``p(x)·π(a|x)``, or ``"internal"``, the
  Boltzmann generator on internal coordinates of a molecule target,
  :class:`~openmm_flowforce.samplers.molecule_flow.MoleculeFlow`, the default there;
  float64) and whose
  training loop owns atomic checkpoints with exact resume, a tqdm progress bar and a
  JSON-lines metrics log; subclasses supply one training step.

Checkpoints follow :mod:`openmm_flowforce.samplers.common` (so ``load_sampler`` and the
CLI rebuild any method's model): ``format``, ``method``, ``target``, ``options`` (resolved),
``model``, ``summary`` (``steps``, ``energy_evaluations``, ``wall_time_s``, ``final_loss``)
and ``state`` (optimizer, torch RNG, the method's ``extra`` state: FAB's buffer and HMC
step sizes). The loop is the training engine's; a run whose checkpoint exists resumes from
it; only ``steps``, ``checkpoint_every`` and ``log_every`` may change on resume.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..flows import RealFlow
from ..flows.equivariant import EquivariantAugmentedFlow
from ..engine import Engine, StateOf
from .common import SAMPLER_CHECKPOINT_FORMAT, check_method, particle_shape, sampler_fingerprint, target_spec
from .registry import SamplerMethod
from ..errors import FlowforceError

Tensor = torch.Tensor

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
    # Molecules (MoleculeTarget): the Boltzmann generator on internal coordinates. FAB's HMC
    # runs on the standardised internal coordinates by default (INTERNAL_AIS_STEP_SIZE); this
    # step_size is for ais_space: cartesian, HMC on Cartesian nm with unit mass, where X–H
    # bonds of p²/q have ω ≈ 470 per unit time, so the leapfrog step must stay well below
    # 2/ω ≈ 0.004 (adapted from there).
    "molecule": dict(flow="internal", scale=1.0, n_layers=8, hidden=128, n_components=8, step_size=0.001),
}

#: Presets that replace ``_PRESETS`` entries for ``flow: equivariant``: ``n_layers`` counts
#: coupling blocks (half move x, half a), ``hidden`` is the EGNN width; small enough for a
#: CPU (an EGNN block on LJ-13 costs ~N² messages per sample).
_EQUIVARIANT_PRESETS: dict[str, dict[str, Any]] = {
    "dw4": dict(n_layers=8, hidden=32, egnn_layers=2, n_importance=20),
    "lj13": dict(n_layers=8, hidden=32, egnn_layers=2, n_importance=20),
    "default": dict(n_layers=8, hidden=32, egnn_layers=2, n_importance=20),
}

#: Options only the equivariant flow reads; set with ``flow: real`` they are refused.
_EQUIVARIANT_ONLY = ("egnn_layers", "aug_scale", "n_importance")

#: Options every flow sampler method has (values of None come from the target's preset).
COMMON_DEFAULTS: dict[str, Any] = dict(
    scale=None, n_layers=None, hidden=None, n_components=None, transform="smooth", mean_free=True,
    steps=1000, batch_size=128, lr=1e-3, grad_clip=100.0, seed=0, checkpoint_every=100, log_every=10,
    flow=None, egnn_layers=None, aug_scale=None, n_importance=None,
)


def target_key(target: Any) -> str:
    """``"molecule"`` for a molecule target (it has ``topology`` and ``system``), else
    ``"gmm40"``, ``"dw4"``, ``"lj13"``, ``"lj55"`` or ``"default"`` for a toy target object."""
    from ..targets.toys import GaussianMixture40, LennardJonesCluster, MultiDoubleWell

    if getattr(target, "topology", None) is not None and getattr(target, "system", None) is not None:
        return "molecule"
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
                  "buffer_size", "min_buffer", "n_updates", "egnn_layers", "n_importance")


def resolve_options(options: Mapping[str, Any], target: Any) -> dict[str, Any]:
    """Options with every None replaced by the target's preset value (where it has one).

    Raises:
        ValueError: an integer option that is not a positive integer, or a non-positive
            ``scale``/``lr``/``step_size``.
    """
    preset = flow_presets(target)
    default_flow = preset.pop("flow", "real")
    if "flow" in options:  # None: the target's own kind of flow (internal coordinates for molecules)
        options = {**options, "flow": options["flow"] or default_flow}
    if options.get("flow") == "equivariant":
        preset.update(_EQUIVARIANT_PRESETS.get(target_key(target), _EQUIVARIANT_PRESETS["default"]))
    elif options.get("flow", "real") in ("real", "internal"):
        given = [key for key in _EQUIVARIANT_ONLY if options.get(key) is not None]
        if given:
            raise FlowforceError(f"option(s) {', '.join(given)} apply only to flow: equivariant; remove them or "
                                 "set flow: equivariant")
    opts = {k: (preset[k] if v is None and k in preset else v) for k, v in options.items()}
    for key in _POSITIVE_INTS:
        if key in _EQUIVARIANT_ONLY and opts.get(key) is None:
            continue  # unused by flow: real (checked above)
        if key in opts and (isinstance(opts[key], bool) or not isinstance(opts[key], int) or opts[key] < 1):
            raise FlowforceError(f"option {key} must be a positive integer, got {opts[key]!r}")
    for key in ("scale", "lr", "step_size"):
        if key in opts and not (isinstance(opts[key], (int, float)) and opts[key] > 0):
            raise FlowforceError(f"option {key} must be a positive number, got {opts[key]!r}")
    if "ais_space" in opts:
        _resolve_ais_space(opts, step_size_given=options.get("step_size") is not None)
    cut = opts.get("energy_cut")
    if cut is not None and (isinstance(cut, bool) or not isinstance(cut, (int, float)) or not math.isfinite(cut)):
        raise FlowforceError(f"option energy_cut must be a finite number of kT or None, got {cut!r}")
    return opts


#: Initial leapfrog step of FAB's HMC in the standardised internal coordinates
#: (``ais_space: internal``), where every coordinate has about unit thermal spread; adapted
#: from there towards the target acceptance.
INTERNAL_AIS_STEP_SIZE = 0.05


def _resolve_ais_space(opts: dict[str, Any], step_size_given: bool) -> None:
    """``ais_space`` None → ``"internal"`` for ``flow: internal``, else ``"cartesian"``; the
    internal space takes :data:`INTERNAL_AIS_STEP_SIZE` unless ``step_size`` was given.

    Raises:
        FlowforceError: ``ais_space: internal`` with a flow that has no internal coordinates.
    """
    if opts["ais_space"] is None:
        opts["ais_space"] = "internal" if opts.get("flow") == "internal" else "cartesian"
    if opts["ais_space"] == "internal":
        if opts.get("flow") != "internal":
            raise FlowforceError(f"ais_space: internal needs flow: internal (a molecule target), got flow: "
                                 f"{opts.get('flow')}; use ais_space: cartesian")
        if not step_size_given:
            opts["step_size"] = INTERNAL_AIS_STEP_SIZE


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
                 options: Mapping[str, Any], extra: dict[str, Any],
                 aux_energy: Callable[[Tensor], Tensor] | None = None):
        self.model, self.energy, self.optimizer, self.options, self.extra = model, energy, optimizer, options, extra
        #: −log π(a|x) of the auxiliary variables (:func:`auxiliary_energy`), None without them
        self.aux_energy = aux_energy

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


def _real_flow(target: Any, opts: Mapping[str, Any]) -> RealFlow:
    """The smooth real-space flow (mean free for particle targets unless ``mean_free`` is False)."""
    shape = particle_shape(target)
    particles = dict(n_particles=shape[0], spatial_dim=shape[1]) if opts["mean_free"] and shape else {}
    return RealFlow(int(target.dim), scale=float(opts["scale"]), transform=opts["transform"],
                    n_layers=int(opts["n_layers"]), hidden=opts["hidden"], n_components=int(opts["n_components"]),
                    **particles)


def _equivariant_flow(target: Any, opts: Mapping[str, Any]) -> EquivariantAugmentedFlow:
    """The SE(d)-equivariant augmented coupling flow (particle targets, always mean free)."""
    shape = particle_shape(target)
    if shape is None or not opts["mean_free"]:
        raise FlowforceError("flow: equivariant needs a particle target (dw4, lj13, lj55) with mean_free: true")
    hidden = opts["hidden"]
    if not isinstance(hidden, int) or isinstance(hidden, bool):
        raise FlowforceError(f"flow: equivariant takes one EGNN width as hidden (an integer), got {hidden!r}")
    return EquivariantAugmentedFlow(shape[0], shape[1], n_layers=int(opts["n_layers"]), hidden=hidden,
                                    egnn_layers=int(opts["egnn_layers"]), transform=opts["transform"],
                                    n_components=int(opts["n_components"]), scale=float(opts["scale"]),
                                    aug_scale=opts["aug_scale"], n_importance=int(opts["n_importance"]))


def _internal_flow(target: Any, opts: Mapping[str, Any]) -> torch.nn.Module:
    """The Boltzmann generator on internal coordinates of a molecule target (:mod:`.molecule_flow`)."""
    from .molecule_flow import internal_flow

    return internal_flow(target, opts)


#: Registry of the flows a flow sampler method can train (option ``flow``).
FLOW_BUILDERS: dict[str, Callable[[Any, Mapping[str, Any]], torch.nn.Module]] = {
    "real": _real_flow,
    "equivariant": _equivariant_flow,
    "internal": _internal_flow,
}


def training_pair(model: torch.nn.Module, energy: Callable[[Tensor], Tensor]):
    """What the training step sees: ``(density model, reduced energy)``. A flow with
    auxiliary variables trains its joint density against the extended target
    (``training_view`` / ``joint_energy``); a plain flow trains itself against u."""
    view = getattr(model, "training_view", None)
    return (view(), model.joint_energy(energy)) if view is not None else (model, energy)


def auxiliary_energy(model: torch.nn.Module) -> Callable[[Tensor], Tensor] | None:
    """``−log π(a|x)`` on flat joint points for a flow with auxiliary variables, else None:
    the part of the extended target's energy that is not the target's (an energy cut must
    act on u(x) only, or a flow gains unbounded entropy by spreading a)."""
    if getattr(model, "training_view", None) is None:
        return None

    def minus_log_aux(joint_points: Tensor) -> Tensor:
        return -model.log_aux(*model.split(joint_points))

    return minus_log_aux


class FlowSamplerMethod(SamplerMethod):
    """A sampler method whose model is a flow of :data:`FLOW_BUILDERS` trained from the energy alone.

    Subclasses set ``name`` and ``defaults`` (including :data:`COMMON_DEFAULTS`) and
    implement :meth:`train_step`, and, if they keep state between steps,
    :meth:`init_extra` / :meth:`extra_state` / :meth:`load_extra`.
    """

    # -- model -------------------------------------------------------------------------
    def build(self, target: Any, options: Mapping[str, Any]) -> torch.nn.Module:
        """A float64 flow for ``target`` from :data:`FLOW_BUILDERS` (option ``flow``),
        initialised from ``seed``."""
        opts = resolve_options(self.options(options), target)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(opts["seed"]))
            return FLOW_BUILDERS[opts["flow"]](target, opts).double()

    def sample(self, model: RealFlow, n: int) -> Tensor:
        """``(n, dim)`` flow samples (float64, mean free for particle flows)."""
        with torch.no_grad():
            return model.sample(int(n))

    def log_prob(self, model: RealFlow, x: Tensor) -> Tensor:
        """log q(x) ``(B,)``, normalised (on the zero-centre-of-mass hyperplane for particle flows;
        the equivariant flow's is its importance-sampled marginal over the auxiliary a, drawn
        from a fixed seed so that evaluations repeat; the caller's RNG is left alone)."""
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
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
        """Train ``model`` (from :meth:`build`) to ``options['steps']`` steps on the
        :class:`~openmm_flowforce.engine.Engine`.

        Resumes from ``checkpoint`` when it exists (same method, target and options up to
        ``steps``, ``checkpoint_every``, ``log_every``): parameters, optimizer, RNG streams,
        counters and method state are restored, so an interrupted and resumed run equals
        an uninterrupted one. Writes the checkpoint atomically every ``checkpoint_every``
        steps, at the end and on Ctrl-C/SIGTERM (after the step in flight). The metrics log
        (JSON lines) gets a row every ``log_every`` steps when ``log_path`` is given.

        Returns:
            ``steps``, ``energy_evaluations``, ``wall_time_s``, ``final_loss``,
            ``resumed_from`` and the last step's metrics.
        """
        opts = resolve_options(self.options(options), target)
        optimizer = torch.optim.Adam(model.parameters(), lr=float(opts["lr"]))
        energy = EnergyCounter(target)
        trained, trained_energy = training_pair(model, energy)
        extra = self.init_extra(trained, target, opts)
        ctx = TrainContext(trained, trained_energy, optimizer, opts, extra, auxiliary_energy(model))
        metrics: dict[str, float] = {}

        def step() -> dict[str, float]:
            metrics.clear()
            metrics.update(self.train_step(ctx))
            return {self.name: metrics["loss"]}

        def summary() -> dict[str, Any]:
            return {"steps": engine.step, "energy_evaluations": energy.count, "wall_time_s": engine.elapsed(),
                    "final_loss": metrics.get("loss", math.nan)}

        def set_count(count: int) -> None:
            energy.count = int(count)

        engine = Engine(
            model, step, int(opts["steps"]), optimizer=optimizer, checkpoint=checkpoint,
            checkpoint_every=int(opts["checkpoint_every"]), fmt=SAMPLER_CHECKPOINT_FORMAT,
            payload=lambda: {"format": SAMPLER_CHECKPOINT_FORMAT, "method": self.name, "target": target_spec(target),
                             "options": dict(opts), "summary": summary()},
            fingerprint=sampler_fingerprint(target, opts), check=check_method(self.name),
            state={"extra": StateOf(lambda: self.extra_state(extra), lambda state: self.load_extra(extra, state)),
                   "energy_evaluations": StateOf(lambda: energy.count, set_count),
                   "metrics": StateOf(lambda: dict(metrics), metrics.update)},
            log_path=log_path, log_every=int(opts["log_every"]),
            log_extra=lambda: {"energy_evaluations": energy.count, **metrics}, progress=self.name if progress else None,
            seed=int(opts["seed"]))
        engine.resume()
        engine.run()
        return {**summary(), "resumed_from": engine.resumed_from, **metrics}
