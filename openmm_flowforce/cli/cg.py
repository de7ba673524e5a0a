"""``flowforce cg``: learn a coarse-grained force field from all-atom MD frames; the work lives in
:mod:`openmm_flowforce.training.flow_matching`."""
from __future__ import annotations

import argparse
from pathlib import Path

from openmm_flowforce.cli.config import CommandFiles, flag
from openmm_flowforce.cli.data import add_data_arguments, data_inputs, load_data_from_args

HELP = "learn a coarse-grained (CG) force field from MD data, by flow-matching (no forces needed) or force matching"

#: As :data:`openmm_flowforce.training.flow_matching.CG_METHODS` (not imported: keeps --help fast).
METHODS = ("flow-matching", "force-matching")
#: As :data:`openmm_flowforce.training.flow_matching.NET_KINDS`.
NETS = ("auto", "mlp", "schnet")
#: As ``("auto",)`` + :data:`openmm_flowforce.coordinates.force_maps.FORCE_MAPS`.
FORCE_MAPS = ("auto", "basic", "optimal")

EPILOG = """\
Methods:
  flow-matching   train a flow (Boltzmann generator) on the mapped CG positions, draw
                  --flow-samples samples, take its forces kT grad log q there, drop samples
                  whose largest bead force exceeds outlier_factor x the outlier_percentile-th
                  percentile of the flow's forces on the data (default 3 x 99.9th) and
                  those where the CG net's priors' forces exceed prior_outlier_factor x
                  the same percentile of the priors' forces on the data (beads that
                  overlap: the flow cannot know they repel, the priors do), add
                  30 % points with the torsions turned (torsion_jitter), then train the CG
                  net on the flow's forces AND its energies -kT log q (up to a constant;
                  cg_loss.energy_weight 1): from 1000 frames of alanine dipeptide this takes
                  the CG MD's phi/psi JS from 0.47 (forces only) to 0.02. Needs positions only.
                  (Koehler, Chen, Kraemer, Clementi, Noe, JCTC 2023, arXiv:2203.11167)
  force-matching  train the CG net on mapped positions and mapped all-atom forces; needs
                  forces in DATA.npz. --force-map optimal (the default when DATA.npz holds
                  its System, as flowforce md writes it) fits the combination of all atoms'
                  forces with the least noise that still estimates the mean force (Kraemer
                  et al. 2023, arXiv:2302.07071), blind to constraint forces (HBonds/HMR
                  data); on alanine dipeptide it halves the torsional force noise. With the
                  internal-coordinate loss (cg_loss.kind auto) it takes the CG MD's phi/psi
                  JS from 1000 frames from 0.41 to 0.045. basic sums each bead's atoms' forces.

Writes CG.ckpt (self-contained model: net, mapping, temperature, CG topology) and CG.pdb
(the CG topology, first mapped frame). Intermediate files CG.flow.ckpt, CG.samples.npz
and CG.state.ckpt make a re-run of the same command continue where it stopped (exactly,
also after Ctrl-C). A re-run with other data or options is refused, naming what differs;
--restart starts over and keeps the old files as NAME.prev.

Config file (YAML; command-line flags win; sections are merged over the defaults; every
value is checked and unknown keys are refused):
  flow:        {n_layers: 6, hidden: [64, 64], n_components: 8, transform: smooth}
  flow_train:  {steps: 2000, batch_size: 256, lr: 0.001}
  flow_samples: 20000
  flow_ensemble: 1          (K flows with seeds seed..seed+K-1, forces and energies averaged)
  torsion_jitter: {fraction: 0.3, sigma_rad: 1.0}   (flow-matching: extra turned points)
  cg_loss:     {kind: auto, energy_weight: null, huber: null, weights: {bond: 1, angle: 1, torsion: 1}}
               (kind: cartesian = forces on beads | internal = generalised forces on bonds,
               angles, torsions, each scaled by its RMS, times weights of its kind | auto =
               internal for force-matching (one chain), cartesian for flow-matching;
               energy_weight: null = 1 for flow-matching, 0 for force-matching;
               huber: delta > 0 = a robust per-frame force loss, linear beyond delta RMS units)
  outlier_percentile: 99.9
  outlier_factor: 3.0
  prior_outlier_factor: 3.0 (the same rule on the priors' forces; 1e9 keeps every sample)
  contact_factor: null      (e.g. 1.0: drop samples where a bead pair >= 3 bonds apart is
                            closer than contact_factor x the closest it came in the data)
  net:         {kind: auto, hidden: [64, 64], activation: silu, priors: [bonds, angles, repulsion],
                dihedral_features: cos_sin,
                schnet: {hidden: 64, interactions: 3, n_rbf: 32, cutoff_nm: 1.2}}
               (kind: mlp | schnet | auto = mlp up to 10 beads, schnet from 11; hidden and
               activation are the MLP's, dihedral_features too (cos_sin | weighted: times the
               sines of the two angles, smooth where an angle turns linear: use it for C-alpha
               chains), schnet: the SchNet's features, interaction blocks,
               radial basis functions and cutoff in nm; schnet.max_pairs: N filters only the N
               shortest pairs, the same energy while at most N pairs are within the cutoff:
               faster for tens of beads and more; default all pairs)
  cg_train:    {steps: 2000, batch_size: 256, lr: 0.003}
  val_fraction: 0.1
  seed: 0
  force_map: auto           (force-matching: auto | basic | optimal, as --force-map)

Example:
  flowforce md --time-ns 5 --out ala.npz
  flowforce cg ala.npz --mapping backbone --out cg.ckpt
  flowforce export cg.ckpt --out cg.pt
  flowforce simulate cg.pt --topology cg.pdb --steps 100000 --timestep-fs 5 --out cg.dcd
"""

#: --quick: sizes for a smoke test (seconds, not a useful model).
QUICK = {"flow": {"n_layers": 2, "hidden": [32, 32], "n_components": 4}, "flow_train": {"steps": 100},
         "flow_samples": 1000, "cg_train": {"steps": 100},
         "net": {"hidden": [32, 32], "schnet": {"hidden": 16, "interactions": 2, "n_rbf": 16}}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from openmm_flowforce.coordinates.cg_mapping import MAPPING_PRESETS
    from openmm_flowforce.training.flow_matching import CG_OPTIONS

    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_data_arguments(parser, "DATA.npz")
    parser.add_argument("--mapping", default=None, choices=list(MAPPING_PRESETS),
                        help="which atoms become beads (default: backbone; for alanine dipeptide 5 beads whose "
                             "dihedrals are phi and psi). A dataset saved CG-mapped (flowforce md --save-cg) "
                             "is used with its own mapping")
    parser.add_argument("--out", required=True, metavar="CG.ckpt", help="CG model file to write (CG.pdb goes next to it)")
    parser.add_argument("--method", default="flow-matching", choices=METHODS, help="default: flow-matching")
    parser.add_argument("--net", choices=NETS,
                        help="CG energy net: mlp (priors + MLP on all pair distances), schnet (priors + CGSchNet "
                             "message passing over bead types; its size does not grow with the protein) or auto (mlp "
                             "up to 10 beads, schnet from 11; the default); also the config key net.kind")
    parser.add_argument("--force-map", choices=FORCE_MAPS,
                        help="force-matching: how all-atom forces become bead forces (optimal: the least-noise map "
                             "fitted to the data, needs the System in DATA.npz; basic: summed per bead; auto, the "
                             "default: optimal when DATA.npz holds its System, else basic)")
    parser.add_argument("--flow-samples", type=flag(CG_OPTIONS["flow_samples"]), metavar="N",
                        help="flow samples to train the CG net on (default 20000)")
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML options (see below)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (seconds; not a useful model)")
    parser.add_argument("--restart", action="store_true",
                        help="start over: ignore CG.flow.ckpt, CG.samples.npz, CG.state.ckpt (kept as NAME.prev)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _mapping_name(mapping) -> str:
    return str(mapping.source.get("preset") or mapping.source.get("selection") or mapping.source)


def _mapping(args: argparse.Namespace, data):
    """``(mapping, mapped)``: the dataset's own mapping for a CG-mapped dataset (a different
    --mapping is refused: beads cannot be mapped again), else the --mapping preset."""
    from openmm_flowforce.errors import OptionError

    stored = data.mapping()
    if stored is None:
        return args.mapping or "backbone", False
    name = _mapping_name(stored)
    if args.mapping is not None and args.mapping != stored.source.get("preset"):
        raise OptionError(f"--mapping {args.mapping}: {args.data[0]} holds frames already mapped with {name} "
                          f"({stored.n_beads} beads), which cannot be mapped again; drop --mapping, or make an "
                          f"all-atom dataset (flowforce md without --save-cg)")
    return stored, True


def _constraints(args: argparse.Namespace, data, required: bool) -> list[tuple[int, int]] | None:
    """The constrained pairs of the System stored in the dataset (the optimal force map needs
    them), or None when it holds none and they are not ``required``."""
    from openmm_flowforce.coordinates.force_maps import system_constraints
    from openmm_flowforce.errors import OptionError
    from openmm_flowforce.safety import deserialize_xml

    if not data.system_xml and not required:
        return None
    if not data.system_xml:
        raise OptionError(f"--force-map optimal needs the System the forces of {args.data[0]} were recorded with (its "
                          "constraints), and the dataset holds none; record it with flowforce md, or use --force-map "
                          "basic")
    return system_constraints(deserialize_xml(data.system_xml, f"the System (system_xml) in {args.data[0]}",
                                              expected="System"))


def _work_files(out: Path) -> dict[str, Path]:
    work = out.with_suffix("") if out.suffix else out
    return {suffix: work.with_name(work.name + suffix) for suffix in (".flow.ckpt", ".samples.npz", ".state.ckpt")}


def files(args: argparse.Namespace) -> CommandFiles:
    out = Path(args.out)
    outputs = {"--out": out, "--out (CG.pdb next to it)": out.with_suffix(".pdb")}
    outputs.update({f"--out ({suffix} next to it)": path for suffix, path in _work_files(out).items()})
    return CommandFiles(inputs={**data_inputs(args, "DATA.npz"), "--config": args.config}, outputs=outputs,
                        resumable=True)


def run(args: argparse.Namespace) -> int:
    """Exit code 0 on success, 2 on bad input."""
    import json

    import torch

    from openmm_flowforce.cli.config import load_config
    from openmm_flowforce.training.flow_matching import CG_OPTIONS, coarse_grain

    from openmm_flowforce.engine import init_distributed, world

    torch.set_num_threads(1)
    init_distributed(use_cuda=False)  # under torchrun: data parallel on CPU (gloo)
    options = {**(QUICK if args.quick else {}), **load_config(args.config, CG_OPTIONS)}
    if args.flow_samples is not None:
        options["flow_samples"] = args.flow_samples
    if args.net is not None:
        options["net"] = {**options.get("net", {}), "kind": args.net}
    if args.force_map is not None:
        options["force_map"] = args.force_map
    data = load_data_from_args(args)
    mapping, mapped = _mapping(args, data)
    wants_map = args.method == "force-matching" and not mapped and options.get("force_map", "auto") != "basic"
    constraints = _constraints(args, data, options.get("force_map") == "optimal") if wants_map else None
    if args.restart and world()[0] == 0:
        from openmm_flowforce.engine import restart

        restart(*_work_files(Path(args.out)).values())
    if world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()  # no process may read the work files while rank 0 moves them away
    result = coarse_grain(data.positions, data.topology, data.temperature, args.out, mapping=mapping,
                          method=args.method, forces=data.forces, options=options, progress=not args.quiet,
                          mapped=mapped, constraints=constraints)
    info = result.info
    if world()[0] != 0:
        return 0
    how = "stored in the dataset" if mapped else "applied now"
    print(f"method      {result.method}, mapping {_mapping_name(result.mapping)} ({how}): "
          f"{result.mapping.n_atoms} atoms -> {result.mapping.n_beads} beads, {data.n_frames} frames at "
          f"{data.temperature:g} K")
    if result.method == "force-matching":
        ratio = info.get("force_map_rms_ratio")
        print(f"forces      {info['force_map']} force map" + ("" if ratio is None else
                                                             f", RMS {ratio:.2f} x the basic map's")
              + f"; {info['cg_loss_kind']} force loss")
    if "dropped_samples" in info:
        print(f"flow        {info['flow_steps']} steps, validation NLL {info['flow_best_val_nll']}, "
              f"{info['flow_seconds']:.1f} s")
        by_priors, by_contacts = info.get("dropped_by_priors", 0), info.get("dropped_by_contacts", 0)
        print(f"samples     {info['flow_samples']} drawn (+ {info.get('torsion_jitter_points', 0)} with turned torsions), "
              f"{info['dropped_samples']} dropped, {info['non_finite_samples']} non-finite")
        print(f"            {info['dropped_samples'] - by_priors - by_contacts} by the flow's force threshold "
              f"{info['force_threshold_kj_mol_nm']:.4g} kJ/mol/nm ({info['outlier_rule']})")
        if info.get("prior_force_threshold_kj_mol_nm") is not None:
            print(f"            {by_priors} by the priors' force threshold "
                  f"{info['prior_force_threshold_kj_mol_nm']:.4g} kJ/mol/nm")
        if info.get("contact_factor") is not None:
            print(f"            {by_contacts} by the contact rule (a pair >= 3 bonds apart closer than "
                  f"{info['contact_factor']:g} x its closest in the data)")
    loss = info["cg_best_val_loss"]
    initial = info["cg_initial_val_loss"]
    print(f"CG net      {result.net.NET}, {info['cg_steps']} steps on {info['training_frames']} frames, "
          "validation force loss "
          f"{json.dumps(initial)} (priors only) -> {json.dumps(loss)}, {info['cg_seconds']:.1f} s")
    print(f"wrote       {result.model_path} and {result.pdb_path}; next: flowforce export {result.model_path} "
          f"--out {result.model_path.with_suffix('.pt')}")
    return 0
