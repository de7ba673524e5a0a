r"""Coarse-grained force fields without all-atom forces: flow-matching, and the force-matching baseline.

Flow-matching (Köhler, Chen, Krämer, Clementi, Noé, "Flow-matching: efficient coarse-graining of
molecular dynamics without forces", JCTC 2023, arXiv:2203.11167) in three stages:

1. **Density.** A Boltzmann generator ``q(X)`` over the CG beads (internal coordinates from the
   CG topology's bonds + a smooth flow) is trained by maximum likelihood on the mapped all-atom
   positions, ``X = M x``, only (``nll_on_data``).
2. **Forces from the density.** At ``N`` flow samples ``X_s ~ q``, the flow's forces are
   ``F_s = kT ∇_X log q(X_s)`` (kJ/mol/nm), computed analytically in the ``to_latent`` direction
   (:func:`~openmm_flowforce.training.losses.flow_forces`) in float64. If ``q`` were exact, these
   would be the exact CG mean forces (the potential of mean force of the mapped ensemble is
   ``−kT log p_CG``), with none of the noise of mapped all-atom forces.
   Samples far out in the flow's tails can carry huge forces; they are dropped by a stated rule
   (:func:`force_outlier_threshold`): a sample is kept when the largest per-bead force norm
   ``max_I |F_I|`` is at most ``factor × (percentile-th percentile of max_I |F_I| over the data
   frames)`` (the flow's own forces on the training data; defaults 99.9 % and 3).
   The same rule is applied to the forces of the CG net's **priors** at the training points
   (``prior_outlier_factor``, :func:`prior_forces`): a flow fitted to few frames also puts
   mass where the data never went, e.g. non-bonded beads on top of each other (chignolin from
   1000 frames: 5 % of the samples, the closest pair at 0.1 σ of the repulsion prior), and
   there its forces, which know nothing of the overlap, contradict the priors by up to
   10¹² kJ/mol/nm: no net can fit such points, and its loss is then those points alone.
3. **CG net.** A :class:`~openmm_flowforce.potentials.cg_net.CGNet` (priors fitted on the
   mapped data by Boltzmann inversion + an MLP or CGSchNet, :func:`build_cg_net`) is trained by force matching on
   ``(X_s, F_s)`` (:func:`~openmm_flowforce.training.cg.train_cg_net`).

Options that help when the data are few (issue 15; measured in BENCHMARKS "smooth flow
forces"): ``flow_ensemble`` (K flows, their forces averaged:
:class:`~openmm_flowforce.training.flow_samples.FlowEnsemble`), ``torsion_jitter`` (extra points
with turned torsions, so the net learns the flow's free energy where the data never went),
``cg_loss.kind: internal`` (generalised forces on bonds, angles and torsions, each scaled by its
RMS: :mod:`~openmm_flowforce.training.internal_forces`) and ``cg_loss.energy_weight`` (also
match the flow's energies ``−kT log q`` up to a constant).

Options for a protein (issue 14; measured on chignolin's Cα beads in BENCHMARKS "Chignolin end
to end"): ``net.dihedral_features: weighted`` (the MLP net's dihedral features stay smooth
where a bonded angle turns linear), ``contact_factor`` (drop samples in which a pair of beads
≥ 3 bonds apart is closer than the data ever had it:
:func:`~openmm_flowforce.training.flow_samples.within_data_contacts`) and ``cg_loss.huber`` (a
robust force loss: :func:`~openmm_flowforce.training.cg.huber_per_frame`).

Force-matching (Noid et al., J. Chem. Phys. 128, 244114 (2008)) trains the same net on the
mapped all-atom positions and the mapped (summed) all-atom forces instead; it needs forces.

Which training forces a method uses is looked up in :data:`CG_METHODS`. :func:`coarse_grain`
runs a whole method and writes a self-contained model file (:func:`save_cg_model`).
Intermediate files next to the output (``OUT.flow.ckpt``, ``OUT.samples.npz``,
``OUT.state.ckpt``) make a re-run continue where it stopped; each records what it was made
from (the data, the options, the flow's parameters), and a re-run with other data or options
is refused rather than continued from them (``flowforce cg --restart`` starts over).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..conventions import kT
from ..coordinates.cg_mapping import CGMapping
from ..coordinates.force_maps import FORCE_MAPS, optimal_force_map
from ..io import CHECKPOINT_FORMAT, atomic_write_npz, load_checkpoint, save_checkpoint
from ..potentials.boltzmann import BoltzmannGenerator
from ..potentials.cg_net import DIHEDRAL_FEATURES, CGNet, cg_metadata, cg_net_class
from .boltzmann import FLOW_OPTIONS, split_frames, train_boltzmann_generator
from .cg import train_cg_net
from ..engine import data_hash, fingerprint, world
from .flow_samples import (FORCE_OUTLIER_FACTOR, FORCE_OUTLIER_PERCENTILE, FlowEnsemble, drop_force_outliers,
                           force_outlier_threshold, jitter_torsions, max_bead_force_norm, sample_flow_forces,
                           within_data_contacts)
from .trainer import TRAIN_CONFIG_OPTIONS, TrainConfig
from ..errors import FlowforceError
from ..options import FRACTION, POSITIVE, POSITIVE_INT, SEED, Option, check_options

Tensor = torch.Tensor

__all__ = ["CG_METHODS", "CGMethodResult", "CoarseGrainResult", "FORCE_OUTLIER_FACTOR", "FORCE_OUTLIER_PERCENTILE",
           "build_cg_net", "coarse_grain", "drop_force_outliers", "force_outlier_threshold", "max_bead_force_norm",
           "prior_forces", "sample_flow_forces", "save_cg_model", "within_prior_forces"]

#: CG net options accepted by :func:`coarse_grain` (``net=...``).
NET_OPTIONS = ("hidden", "activation", "priors", "kind", "schnet", "dihedral_features")
#: ``net.kind``: which CG net (:data:`~openmm_flowforce.potentials.cg_net.CG_NETS`); ``auto``
#: is the MLP below :data:`AUTO_SCHNET_MIN_BEADS` beads and CGSchNet from there on.
NET_KINDS = ("auto", "mlp", "schnet")
#: The MLP's first layer sees all n(n−1)/2 pair distances, so its size grows as n² and it knows
#: no bead is like another; SchNet shares its weights over pairs and bead types. Measured at
#: chignolin's 10 Cα (BENCHMARKS.md "CGSchNet speed and the net choice"): at equal training
#: budget the MLP fits a known mean force 7× better (loss 0.038 vs 0.26), on the 1000-frame
#: GBn2 reference neither net beats its priors on held-out frames (so both models are their
#: priors), and through the native plugin the MLP step is 3.5–5.6× cheaper; so up to 10 beads
#: the MLP, from 11 SchNet (untested against the MLP there; its size does not grow with n).
AUTO_SCHNET_MIN_BEADS = 11
#: ``net.schnet``: CGSchNet's architecture (defaults :data:`~openmm_flowforce.potentials.schnet.SCHNET_DEFAULTS`).
SCHNET_OPTION_SCHEMA: dict[str, Option] = {"hidden": POSITIVE_INT, "interactions": Option(int, minimum=0),
                                           "n_rbf": Option(int, minimum=2), "cutoff_nm": POSITIVE,
                                           "max_pairs": POSITIVE_INT}
#: Types of the CG net options; the activation and prior names are checked by the net,
#: which lists the valid ones. ``hidden`` and ``activation`` are the MLP's, ``schnet`` CGSchNet's;
#: the net ``kind`` chooses uses its own and not the other's.
NET_OPTION_SCHEMA: dict[str, Option] = {"hidden": Option(list, item=POSITIVE_INT), "activation": Option(str),
                                        "priors": Option(object), "kind": Option(str, choices=NET_KINDS),
                                        "schnet": Option(dict, fields=SCHNET_OPTION_SCHEMA),
                                        "dihedral_features": Option(str, choices=DIHEDRAL_FEATURES)}
#: Every coarse-graining option (``flowforce cg --config`` keys), with its sections.
#: ``cg_loss``: which force-matching loss trains the CG net. ``cartesian`` matches the force on
#: every bead; ``internal`` the generalised forces on bonds, angles and torsions, each scaled by
#: its RMS and weighted by its kind (:mod:`~openmm_flowforce.training.internal_forces`).
CG_LOSS_KINDS = ("cartesian", "internal")
#: ``cg_loss.kind: auto`` (the default): ``internal`` for force matching (from 1000 alanine-
#: dipeptide frames with the optimal force map it takes the CG MD's φ/ψ JS from 0.10 to 0.045,
#: BENCHMARKS "Optimal force maps"), where the CG molecule has internal coordinates (one
#: connected chain); ``cartesian`` otherwise (flow-matching: the energy term does better).
AUTO_LOSS_KIND = {"force-matching": "internal"}
CG_LOSS_OPTIONS: dict[str, Option] = {
    "kind": Option(str, choices=("auto",) + CG_LOSS_KINDS),
    "weights": Option(dict, fields={k: Option(float, minimum=0.0) for k in ("bond", "angle", "torsion")}),
    "energy_weight": Option(float, minimum=0.0, nullable=True),
    "huber": Option(float, minimum=0.0, open_minimum=True, nullable=True),
}
#: ``cg_loss.energy_weight`` when not given: methods that give energies at their training points
#: (flow-matching: −kT log q) match them with this weight; the others (force matching) with 0.
#: Measured in BENCHMARKS "smooth flow forces": at 1000 frames it takes the CG MD's φ/ψ JS from
#: 0.47 to 0.02 (issue 15).
DEFAULT_ENERGY_WEIGHT = 1.0
#: ``torsion_jitter`` defaults: 30 % extra points, torsions turned by N(0, 1 rad).
DEFAULT_TORSION_JITTER = {"fraction": 0.3, "sigma_rad": 1.0}
#: ``torsion_jitter``: extra flow-matching training points (``fraction`` × ``flow_samples``) made
#: by turning the periodic torsions of flow samples by normal noise of ``sigma_rad``.
JITTER_OPTIONS: dict[str, Option] = {"fraction": Option(float, minimum=0.0), "sigma_rad": Option(float, minimum=0.0)}
CG_OPTIONS: dict[str, Option] = {
    "flow": Option(dict, fields=FLOW_OPTIONS), "flow_train": Option(dict, fields=TRAIN_CONFIG_OPTIONS),
    "flow_samples": Option(int, minimum=2), "flow_ensemble": POSITIVE_INT, "cg_loss": Option(dict, fields=CG_LOSS_OPTIONS),
    "torsion_jitter": Option(dict, fields=JITTER_OPTIONS), "outlier_percentile": Option(float, minimum=0.0, maximum=100.0),
    "outlier_factor": POSITIVE, "prior_outlier_factor": POSITIVE,
    "contact_factor": Option(float, minimum=0.0, open_minimum=True, nullable=True),
    "net": Option(dict, fields=NET_OPTION_SCHEMA),
    "cg_train": Option(dict, fields=TRAIN_CONFIG_OPTIONS), "val_fraction": FRACTION, "seed": SEED,
    "force_map": Option(str, choices=("auto",) + FORCE_MAPS),
}


# -- methods: where the training forces come from -------------------------------------------------
@dataclass
class CGMethodInputs:
    """What a method gets. Positions and forces are mapped (CG) training frames, float64.

    Attributes:
        positions: ``(T, n, 3)`` nm.
        forces: ``(T, n, 3)`` kJ/mol/nm, or None (data without forces).
        mapping: the CG mapping.
        temperature: K.
        work: prefix of intermediate files (``OUT`` without suffix), or None for none.
        options: method options (``flow``, ``flow_train``, ``flow_samples``, ``outlier_percentile``,
            ``outlier_factor``, ``prior_outlier_factor``, ``val_fraction``, ``seed``).
        progress: show progress bars.
        prior_forces: forces (kJ/mol/nm) of the CG net's priors at positions ``(T, n, 3)`` nm
            (:func:`prior_forces`), for the prior outlier rule; None: no such rule.
    """

    positions: np.ndarray
    forces: np.ndarray | None
    mapping: CGMapping
    temperature: float
    work: Path | None
    options: dict[str, Any]
    progress: bool = True
    prior_forces: Callable[[np.ndarray], np.ndarray] | None = None


@dataclass
class CGMethodResult:
    """Training set for the CG net, and what the method measured (plain data, for the report)."""

    positions: np.ndarray
    forces: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    energies: np.ndarray | None = None  # kJ/mol, up to a constant (flow-matching: −kT log q)


def _force_matching(inputs: CGMethodInputs) -> CGMethodResult:
    if inputs.forces is None:
        raise FlowforceError("--method force-matching needs all-atom forces, but the data file has none; record them "
                             "with `flowforce md` (it saves forces), or use --method flow-matching, which needs "
                             "positions only")
    return CGMethodResult(inputs.positions, inputs.forces, {"training_frames": int(len(inputs.positions))})


def _work_file(inputs: CGMethodInputs, suffix: str) -> Path | None:
    return None if inputs.work is None else inputs.work.with_name(inputs.work.name + suffix)


def _train_flows(inputs: CGMethodInputs) -> tuple[list[BoltzmannGenerator], list[Any]]:
    """The flow (``flow_ensemble`` = 1) or the ensemble's members, each resumable from its file:
    ``OUT.flow.ckpt`` and, for member k ≥ 1 (seed + k), ``OUT.flow{k}.ckpt``."""
    import dataclasses
    import tempfile

    opts = inputs.options
    models, trainers = [], []
    with tempfile.TemporaryDirectory(prefix="flowforce-cg-") as tmp:
        for k in range(int(opts["flow_ensemble"])):
            suffix = ".flow.ckpt" if k == 0 else f".flow{k}.ckpt"
            checkpoint = _work_file(inputs, suffix) or Path(tmp) / f"flow{k}.ckpt"
            config = opts["flow_train"] if k == 0 else dataclasses.replace(opts["flow_train"],
                                                                           seed=opts["flow_train"].seed + k)
            model, trainer = train_boltzmann_generator(
                inputs.mapping.cg_topology(), inputs.positions, checkpoint, temperature=inputs.temperature,
                flow=opts.get("flow"), config=config, val_fraction=opts["val_fraction"],
                progress=inputs.progress, extra_metadata={"mapping": inputs.mapping.to_dict()})
            models.append(model)
            trainers.append(trainer)
    return models, trainers


def _flow_matching(inputs: CGMethodInputs) -> CGMethodResult:
    opts = inputs.options
    t0 = time.perf_counter()
    flow_ckpt = _work_file(inputs, ".flow.ckpt")
    models, trainers = _train_flows(inputs)
    ensemble = FlowEnsemble(models)
    flow_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    n = int(opts["flow_samples"])
    kt = kT(inputs.temperature)
    samples_file = _work_file(inputs, ".samples.npz")
    # The cache is valid only for these very flow parameters, sample count, seed and temperature.
    parameters = [value for model in models for value in model.state_dict().values()]
    drawn_by = data_hash(*parameters, n, int(opts["seed"]), float(inputs.temperature))
    cached = None
    if samples_file is not None and samples_file.exists():
        try:
            with np.load(samples_file, allow_pickle=False) as data:
                if str(data["drawn_by"]) == drawn_by:
                    cached = np.asarray(data["positions"]), np.asarray(data["forces"]), np.asarray(data["energies"])
        except Exception:  # noqa: BLE001 - an unreadable or older cache is redrawn, not an error
            cached = None
    if cached is None:
        x, f, u = sample_flow_forces(ensemble, n, inputs.temperature, seed=int(opts["seed"]),
                                     progress=inputs.progress, return_energies=True)
        if samples_file is not None and world()[0] == 0:
            atomic_write_npz(samples_file, {"positions": x, "forces": f, "energies": u, "requested": n,
                                            "seed": int(opts["seed"]), "drawn_by": np.array(drawn_by)})
    else:
        x, f, u = cached
    non_finite = n - len(x)
    # The threshold comes from the flow's forces on (at most n) data frames.
    data = torch.as_tensor(inputs.positions[:n], dtype=torch.float64)
    on_data = kt * ensemble.log_q_and_forces(data)[1].detach().numpy()
    threshold = force_outlier_threshold(on_data, opts["outlier_percentile"], opts["outlier_factor"])
    jitter = opts["torsion_jitter"]
    n_jitter = int(round(float(jitter["fraction"]) * len(x)))
    if n_jitter > 0 and float(jitter["sigma_rad"]) > 0:
        picked = np.random.default_rng(int(opts["seed"])).choice(len(x), size=n_jitter, replace=n_jitter > len(x))
        xj, fj, lj = jitter_torsions(ensemble, x[picked], float(jitter["sigma_rad"]), seed=int(opts["seed"]))
        x, f, u = np.concatenate([x, xj]), np.concatenate([f, kt * fj]), np.concatenate([u, -kt * lj])
        # Flow samples are independent: shuffled, the CG net's validation block (the last
        # frames) holds turned and plain points alike.
        order = np.random.default_rng(int(opts["seed"]) + 1).permutation(len(x))
        x, f, u = x[order], f[order], u[order]
    x_kept, f_kept, kept = drop_force_outliers(x, f, threshold)
    prior_threshold, by_priors = None, np.zeros(len(x), dtype=bool)
    if inputs.prior_forces is not None:
        within, prior_threshold = within_prior_forces(inputs.prior_forces, x, inputs.positions[:n],
                                                      opts["outlier_percentile"], opts["prior_outlier_factor"])
        by_priors = kept & ~within
        kept = kept & within
        x_kept, f_kept = x[kept], f[kept]
    by_contacts = np.zeros(len(x), dtype=bool)
    if opts["contact_factor"] is not None:
        from ..potentials.priors import BeadGraph

        far = BeadGraph.from_bonds(inputs.mapping.n_beads, inputs.mapping.bonds).nonbonded
        within, _ = within_data_contacts(x, inputs.positions, far, float(opts["contact_factor"]))
        by_contacts = kept & ~within
        kept = kept & within
        x_kept, f_kept = x[kept], f[kept]
    if len(x_kept) < 2:
        raise FlowforceError(f"only {len(x_kept)} of {n} flow samples pass the force thresholds ({threshold:.4g} "
                             "kJ/mol/nm on the flow's forces, "
                             f"{'none' if prior_threshold is None else f'{prior_threshold:.4g}'} on the priors'); "
                             "train the flow longer or raise outlier_factor, prior_outlier_factor or contact_factor")
    info = {"flow_checkpoint": None if flow_ckpt is None else str(flow_ckpt),
            "flow_steps": int(trainers[0].step), "flow_ensemble": len(models),
            "flow_best_val_nll": None if trainers[0].best_state is None else float(trainers[0].best_val),
            "flow_seconds": flow_seconds, "flow_samples": n, "non_finite_samples": int(non_finite),
            "outlier_rule": (f"keep a sample when max_I |F_I| <= {opts['outlier_factor']:g} x the "
                             f"{opts['outlier_percentile']:g}th percentile of max_I |F_I| of the flow's forces "
                             "on the data frames"
                             + ("" if prior_threshold is None else
                                f", and max_I |F_prior,I| <= {opts['prior_outlier_factor']:g} x the same percentile "
                                "of the priors' forces on the data frames")),
            "outlier_percentile": float(opts["outlier_percentile"]), "outlier_factor": float(opts["outlier_factor"]),
            "force_threshold_kj_mol_nm": threshold, "dropped_samples": int((~kept).sum()),
            "prior_force_threshold_kj_mol_nm": prior_threshold, "dropped_by_priors": int(by_priors.sum()),
            "contact_factor": opts["contact_factor"], "dropped_by_contacts": int(by_contacts.sum()),
            "training_frames": int(len(x_kept)), "sampling_seconds": time.perf_counter() - t0,
            "torsion_jitter_points": int(n_jitter),
            "median_max_force_on_data": float(np.median(max_bead_force_norm(on_data))),
            "median_max_force_on_samples": float(np.median(max_bead_force_norm(f)))}
    return CGMethodResult(x_kept, f_kept, info, energies=u[kept])


#: Method name → ``(inputs) -> training set``. The CG net is then trained the same way for all.
CG_METHODS: dict[str, Callable[[CGMethodInputs], CGMethodResult]] = {
    "flow-matching": _flow_matching,
    "force-matching": _force_matching,
}


# -- the whole run ----------------------------------------------------------------------------------
def prior_forces(net: CGNet, positions: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Forces of ``net``'s priors alone, ``−∇ Σ E_prior`` ``(T, n, 3)`` kJ/mol/nm, at CG positions
    ``(T, n, 3)`` nm (float64, in chunks; the net's parameters get no gradient)."""
    parameter = next(net.parameters())
    out = []
    for start in range(0, len(positions), chunk):
        x = torch.as_tensor(np.asarray(positions[start:start + chunk]), dtype=parameter.dtype,
                            device=parameter.device).requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(net.prior_energy(x).sum(), x)
        out.append(-grad.detach().cpu().double().numpy())
    return np.concatenate(out) if out else np.zeros((0, net.n_beads, 3))


def within_prior_forces(forces_of: Callable[[np.ndarray], np.ndarray], positions: np.ndarray, data: np.ndarray,
                        percentile: float = FORCE_OUTLIER_PERCENTILE,
                        factor: float = FORCE_OUTLIER_FACTOR) -> tuple[np.ndarray, float]:
    """Which training points the priors can live with: the prior outlier rule (module docstring).

    Args:
        forces_of: the priors' forces (kJ/mol/nm) at positions ``(T, n, 3)`` nm, e.g.
            ``lambda x: prior_forces(net, x)``.
        positions: the candidate training points ``(T, n, 3)`` nm.
        data: the data frames ``(T', n, 3)`` nm that set the threshold.
        percentile, factor: the rule: keep a point when ``max_I |F_prior,I| ≤ factor ×`` the
            ``percentile``-th percentile of the same on ``data``.

    Returns:
        ``(kept, threshold)``: a boolean ``(T,)`` and the threshold in kJ/mol/nm.
    """
    threshold = force_outlier_threshold(forces_of(data), percentile, factor)
    return max_bead_force_norm(forces_of(positions)) <= threshold, threshold


def net_kind(options: Mapping[str, Any], n_beads: int) -> str:
    """The CG net ``net.kind`` asks for (``auto``: by bead count, :data:`AUTO_SCHNET_MIN_BEADS`)."""
    kind = str(options.get("kind", "auto"))
    if kind == "auto":
        return "schnet" if n_beads >= AUTO_SCHNET_MIN_BEADS else "mlp"
    return kind


def build_cg_net(mapping: CGMapping, positions: np.ndarray, temperature: float,
                 options: Mapping[str, Any]) -> CGNet:
    """A CG net with priors fitted to CG ``positions`` ``(T, n, 3)`` nm, from the ``net`` options."""
    kind = net_kind(options, mapping.n_beads)
    own = {"mlp": ("hidden", "activation", "dihedral_features"), "schnet": ()}[kind]
    kwargs = {key: options[key] for key in (*own, "priors") if key in options}
    if kind == "schnet":
        kwargs.update(options.get("schnet") or {})
    return cg_net_class(kind).from_data(mapping, positions, temperature, **kwargs)



@dataclass
class CoarseGrainResult:
    """What :func:`coarse_grain` produced.

    Attributes:
        net: the trained CG net (eval mode).
        mapping: the mapping.
        model_path: the model file; pdb_path: the CG topology PDB next to it.
        method: the method's name; info: its measurements, plus the CG net's losses and timings.
    """

    net: CGNet
    mapping: CGMapping
    model_path: Path
    pdb_path: Path
    method: str
    info: dict[str, Any]


def save_cg_model(path: str | Path, net: CGNet, mapping: CGMapping, temperature: float, topology_pdb: str,
                  extra: Mapping[str, Any] | None = None) -> Path:
    """Write a self-contained CG model file atomically (readable by
    :func:`~openmm_flowforce.potentials.cg_net.load_cg_net`).

    Metadata: ``kind`` (``cg_energy_net``), ``net`` (config), ``mapping`` (dict), ``temperature``
    (K), ``topology_pdb`` (the CG molecule), plus ``extra`` (how it was trained)."""
    metadata = {**cg_metadata(net, mapping), "temperature": float(temperature), "topology_pdb": topology_pdb,
                **dict(extra or {})}
    save_checkpoint({"format": CHECKPOINT_FORMAT, "model": net.state_dict(), "metadata": metadata}, path)
    return Path(path)


def _options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "flow": {"n_layers": 6, "hidden": [64, 64], "n_components": 8},
        "flow_train": {"steps": 2000, "batch_size": 256, "validate_every": 100},
        # No "huber" key in cg_loss: the CG nets cached by older runs keep their fingerprint.
        "flow_samples": 20000, "flow_ensemble": 1, "cg_loss": {"kind": "auto", "energy_weight": None},
        "torsion_jitter": dict(DEFAULT_TORSION_JITTER),
        "outlier_percentile": FORCE_OUTLIER_PERCENTILE, "outlier_factor": FORCE_OUTLIER_FACTOR,
        "prior_outlier_factor": FORCE_OUTLIER_FACTOR, "contact_factor": None, "net": {"hidden": [64, 64]},
        "cg_train": {"steps": 2000, "batch_size": 256, "lr": 3e-3, "validate_every": 100},
        "val_fraction": 0.1, "seed": 0, "force_map": "auto",
    }
    out = {**defaults, **check_options(dict(options or {}), CG_OPTIONS)}
    for section in ("flow", "flow_train", "net", "cg_train", "cg_loss", "torsion_jitter"):
        out[section] = {**defaults[section], **dict(out[section])}
    for section in ("flow_train", "cg_train"):
        cfg = dict(out[section])
        cfg.setdefault("seed", int(out["seed"]))
        out[section] = TrainConfig.from_dict(cfg, section=section)
    return out


def coarse_grain(positions: Any, topology: Any, temperature: float, out: str | Path, mapping: str | CGMapping = "backbone",
                 method: str = "flow-matching", forces: Any = None, options: Mapping[str, Any] | None = None,
                 progress: bool = True, mapped: bool = False,
                 constraints: Sequence[Sequence[int]] | None = None) -> CoarseGrainResult:
    """Learn a CG force field from all-atom MD frames and write it to ``out``.

    Args:
        positions: all-atom positions ``(T, N, 3)`` nm.
        topology: ``openmm.app.Topology`` of the all-atom molecule.
        temperature: K of the data.
        out: model file to write (``CG.ckpt``); the CG topology goes to ``out`` with ``.pdb``,
            intermediate files to ``out`` + ``.flow.ckpt`` / ``.samples.npz`` / ``.state.ckpt``
            (reused by a re-run).
        mapping: a preset name (``backbone``, ``ca``, ``residue-com``) or a :class:`CGMapping`.
        method: a key of :data:`CG_METHODS`.
        forces: all-atom forces ``(T, N, 3)`` kJ/mol/nm (force-matching only).
        options: overrides of the defaults: ``flow`` (CouplingFlow options), ``flow_train`` and
            ``cg_train`` (:class:`TrainConfig` fields), ``flow_samples``, ``outlier_percentile``,
            ``outlier_factor``, ``prior_outlier_factor``, ``contact_factor``, ``cg_loss``
            (``kind``, ``weights``, ``energy_weight``, ``huber``), ``torsion_jitter``,
            ``flow_ensemble``, ``net`` (``kind`` auto/mlp/schnet; the MLP's ``hidden``,
            ``activation``, ``dihedral_features``; ``priors``; ``schnet``: ``hidden``, ``interactions``, ``n_rbf``,
            ``cutoff_nm``, ``max_pairs``), ``val_fraction``,
            ``seed``. Sections are merged key by key over the defaults; unknown keys are rejected.
        progress: progress bars.
        mapped: ``positions`` and ``forces`` are already the beads of ``mapping`` (a
            :class:`CGMapping`), ``(T, n_beads, 3)``, as ``flowforce md --save-cg`` stores
            them; they are used as they are and ``topology`` is not read.
        constraints: constrained atom pairs of the System the forces were recorded with (``[]``
            for none), for the optimal force map of force matching
            (:mod:`~openmm_flowforce.coordinates.force_maps`); None: not known, and the option
            ``force_map: auto`` (the default) then uses the basic map, else the optimal one.

    Returns:
        :class:`CoarseGrainResult`.

    Raises:
        ValueError: unknown method, mapping or option; force-matching without forces.
    """
    if method not in CG_METHODS:
        raise FlowforceError(f"unknown coarse-graining method {method!r}; valid: {', '.join(CG_METHODS)}")
    if mapped and not isinstance(mapping, CGMapping):
        raise FlowforceError("mapped=True needs the CGMapping the frames were mapped with, not a preset name")
    if not isinstance(mapping, CGMapping):
        mapping = CGMapping.from_topology(topology, mapping)
    out = Path(out)
    opts = _options(options)
    force_map = opts["force_map"]
    if force_map == "optimal" and (method != "force-matching" or mapped):
        raise FlowforceError("force_map: optimal maps all-atom forces for --method force-matching; "
                             + ("this dataset holds CG-mapped frames only" if mapped else f"--method {method} "
                                "uses no forces") + ", so drop the option")
    if force_map == "auto":  # measured: BENCHMARKS "Optimal force maps"
        force_map = "optimal" if method == "force-matching" and not mapped and constraints is not None else "basic"
    info_map: dict[str, Any] = {"force_map": force_map}
    if mapped:
        x_cg = np.asarray(positions, dtype=np.float64)
        f_cg = None if forces is None else np.asarray(forces, dtype=np.float64)
        if x_cg.ndim != 3 or x_cg.shape[1:] != (mapping.n_beads, 3) or (f_cg is not None and f_cg.shape != x_cg.shape):
            raise FlowforceError(f"pre-mapped positions {x_cg.shape} and forces "
                                 f"{None if f_cg is None else f_cg.shape} must be (T, {mapping.n_beads}, 3)")
    else:
        x_cg = np.asarray(mapping.map_positions(np.asarray(positions, dtype=np.float64)))
        f_cg = None if forces is None else np.asarray(mapping.map_forces(np.asarray(forces, dtype=np.float64)))
    train, _ = split_frames(len(x_cg), float(opts["val_fraction"]))
    if force_map == "optimal" and f_cg is not None:  # fitted to the training frames only
        all_atom = np.asarray(forces, dtype=np.float64)
        weights = optimal_force_map(all_atom[train], mapping.position_matrix, constraints or ())
        basic_rms = float(np.sqrt(np.mean(f_cg[train] ** 2)))
        f_cg = np.einsum("Ia,tac->tIc", weights, all_atom)
        info_map["force_map_rms_ratio"] = float(np.sqrt(np.mean(f_cg[train] ** 2))) / basic_rms
    work = out.with_suffix("") if out.suffix else out
    with torch.random.fork_rng(devices=[]):  # the net's initial weights come from the seed alone
        torch.manual_seed(int(opts["seed"]))
        net = build_cg_net(mapping, x_cg[train], float(temperature), opts["net"]).to(torch.float64)
    # The priors are fitted to the data before the method runs, so that it can drop training
    # points where they and the method's forces cannot both hold (prior_outlier_factor).
    inputs = CGMethodInputs(x_cg, f_cg, mapping, float(temperature), work, opts, progress,
                            prior_forces=lambda positions: prior_forces(net, positions))
    t0 = time.perf_counter()
    result = CG_METHODS[method](inputs)
    method_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    state = work.with_name(work.name + ".state.ckpt")
    energy_weight = opts["cg_loss"]["energy_weight"]
    if energy_weight is None:
        energy_weight = DEFAULT_ENERGY_WEIGHT if result.energies is not None else 0.0
    energy_weight = float(energy_weight)
    if energy_weight > 0 and result.energies is None:
        raise FlowforceError(f"cg_loss.energy_weight needs energies at the training points, which --method {method} "
                             "does not give; set it to 0 or use --method flow-matching")
    energies = result.energies if energy_weight > 0 else None
    internal, loss = None, dict(opts["cg_loss"])
    if loss["kind"] == "internal" or (loss["kind"] == "auto" and AUTO_LOSS_KIND.get(method) == "internal"):
        from .internal_forces import InternalForceLoss, internal_coordinates

        try:
            internal = InternalForceLoss(internal_coordinates(mapping.cg_topology()), loss.get("weights"))
        except ValueError:
            if loss["kind"] == "internal":
                raise  # auto: no Z-matrix for this CG molecule (e.g. several chains), so Cartesian
    loss["kind"] = "internal" if internal is not None else "cartesian"  # the fingerprint holds what ran
    hashed = (result.positions, result.forces) if energies is None else (result.positions, result.forces, energies)
    trained_from = fingerprint(data_hash(*hashed, float(temperature)),
                               {"method": method, "mapping": mapping.to_dict(), "net": opts["net"],
                                "cg_loss": loss, "val_fraction": float(opts["val_fraction"])})
    fit = train_cg_net(net, result.positions, result.forces, opts["cg_train"], val_fraction=float(opts["val_fraction"]),
                       checkpoint=state, progress=progress, mapping=mapping, fingerprint=trained_from,
                       internal=internal, energies=energies, energy_weight=energy_weight,
                       huber=opts["cg_loss"].get("huber"))
    info = {**result.info, **info_map, "cg_loss_kind": loss["kind"], "method_seconds": method_seconds,
            "cg_seconds": time.perf_counter() - t0,
            "cg_steps": fit.steps, "cg_force_scale": fit.force_scale, "cg_initial_val_loss": fit.initial_val_loss,
            "cg_best_val_loss": fit.best_val_loss, "data_frames": int(len(x_cg)), "n_beads": mapping.n_beads}
    pdb_text = mapping.pdb_text(x_cg[0])
    pdb_path = out.with_suffix(".pdb")
    if world()[0] == 0:  # in a distributed run, every process holds the same net
        mapping.write_pdb(pdb_path, x_cg[0])
        save_cg_model(out, net, mapping, temperature, pdb_text, {"method": method, "training": _plain(info)})
    return CoarseGrainResult(net, mapping, out, pdb_path, method, info)


def _plain(values: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-able copy: floats that are not finite become None."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


def load_cg_model_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a CG model file (kind, net, mapping, temperature, topology_pdb, ...)."""
    return load_checkpoint(path, CHECKPOINT_FORMAT).get("metadata", {})
