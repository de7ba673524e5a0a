"""``flowforce md``: argument parsing and printing; the work lives in :mod:`openmm_flowforce.md`."""
from __future__ import annotations

import argparse
import sys

from openmm_flowforce.cli.config import CommandFiles, flag
from openmm_flowforce.errors import OptionError
from openmm_flowforce.options import NON_NEGATIVE, POSITIVE, POSITIVE_INT, SEED

HELP = "run reference MD of a molecule and save positions, forces and energies to one .npz dataset"

DESCRIPTION = """\
Run reference molecular dynamics (Langevin, no cutoff, vacuum or implicit solvent) and
save the frames, forces and energies that flows are trained on to one .npz file.

Give one system (default: the built-in alanine dipeptide):
  --system alanine-dipeptide               built-in, amber14-all.xml
  --pdb FILE [--forcefield XML ...]        OpenMM force field (default amber14-all.xml)
  --prmtop FILE --inpcrd FILE              AMBER
  --psf FILE --toppar FILE... --crd FILE   CHARMM (or --pdb FILE for the coordinates)
  --top FILE --gro FILE                    GROMACS (the .top must be self-contained or its
                                           #include files findable by parmed)

The run: energy minimisation, --equilibration-ps of unrecorded dynamics, then one frame
every --save-every-ps for --time-ns. Ctrl-C stops early and still saves the frames so far.

Proteins (--solvent gbn2 --hmr): GBn2 implicit solvent with amber14, and hydrogen-mass
repartitioning (hydrogens bonded to heavy atoms get --hydrogen-mass, default 1.5 Da, taken
from their heavy atom) with rigid bonds to hydrogen: a 4 fs time step. Masses do not change
which configurations are sampled. Constraints do matter for force matching: the recorded
forces are the force field's, without the constraint forces, so a CG bead that holds a
constrained heavy atom but not its hydrogens (ca, backbone) gets a biased mapped force;
residue-com beads hold whole residues and are unaffected. Flow-matching (flowforce cg,
the default method) uses positions only, so it does not need forces at all.

Replicas (--replicas N --workers K): N independent runs, K at a time in separate
processes (one CPU thread each; CUDA when present), all written into ONE dataset with the
replica of every frame and each replica's start, seed, platform, steps, wall time and
ns/day. Starts cycle through --starts: input (the minimised input) and unfolded (the end of
--unfold-ps at --unfold-temperature, with the replica's own seed). Finished replicas are kept
in OUT.parts/; after Ctrl-C, SIGTERM or a crash, the same command runs only the missing
ones (and asking for more replicas later extends the run). OUT.parts/ is removed once OUT
is written (unless --keep-parts).

--save-cg ca|backbone|residue-com stores only bead positions and mapped forces (and the
mapping), so long runs need not keep every atom; flowforce cg reads such a file as is.

Examples (the first about 10 s on one core; implicit solvent is ~30x slower):
  flowforce md --system alanine-dipeptide --time-ns 1 --save-every-ps 1 --out ala.npz
  flowforce md --pdb cln025.pdb --solvent gbn2 --hmr --replicas 8 --workers 2 \\
      --time-ns 0.5 --save-cg backbone --out cln025.npz
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from openmm_flowforce.coordinates.cg_mapping import MAPPING_PRESETS
    from openmm_flowforce.md.systems import BUILTIN_SYSTEMS, CONSTRAINTS, DEFAULT_HYDROGEN_MASS, SOLVENTS

    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    system = parser.add_argument_group("system (give one)")
    system.add_argument("--system", metavar="NAME", help=f"built-in system: {', '.join(BUILTIN_SYSTEMS)}")
    system.add_argument("--pdb", metavar="FILE", help="PDB file (with --psf: the CHARMM coordinates)")
    system.add_argument("--forcefield", nargs="+", metavar="XML",
                        help="OpenMM force field files for --pdb/--system (default amber14-all.xml)")
    system.add_argument("--prmtop", metavar="FILE", help="AMBER topology (with --inpcrd)")
    system.add_argument("--inpcrd", metavar="FILE", help="AMBER coordinates")
    system.add_argument("--psf", metavar="FILE", help="CHARMM PSF (with --toppar and --crd or --pdb)")
    system.add_argument("--crd", metavar="FILE", help="CHARMM coordinates")
    system.add_argument("--toppar", nargs="+", metavar="FILE",
                        help="CHARMM topology/parameter/stream files (.rtf .prm .str), read by parmed")
    system.add_argument("--top", metavar="FILE", help="GROMACS topology (with --gro)")
    system.add_argument("--gro", metavar="FILE", help="GROMACS coordinates")
    system.add_argument("--solvent", choices=list(SOLVENTS), default="vacuum",
                        help="; ".join(f"{name}: {solvent.description}" for name, solvent in SOLVENTS.items())
                             + " (default: vacuum)")
    system.add_argument("--constraints", choices=list(CONSTRAINTS), default=None,
                        help="none (default without --hmr): every bond flexible, as a flow that models all "
                             "coordinates needs; hbonds (default with --hmr): rigid bonds to hydrogen, allows "
                             "--timestep-fs 2 (4 with --hmr). The recorded forces do not include constraint forces")
    system.add_argument("--hmr", action="store_true",
                        help=f"hydrogen-mass repartitioning: hydrogens get --hydrogen-mass (default "
                             f"{DEFAULT_HYDROGEN_MASS:g} Da), taken from their heavy atom; with hbonds constraints "
                             "a 4 fs time step. Sampled configurations are unchanged")
    system.add_argument("--hydrogen-mass", type=flag(POSITIVE), default=None, metavar="DA",
                        help=f"hydrogen mass for --hmr, in Da (default {DEFAULT_HYDROGEN_MASS:g})")

    run_group = parser.add_argument_group("simulation")
    run_group.add_argument("--temperature", type=flag(POSITIVE), default=300.0, metavar="K",
                           help="kelvin (default 300)")
    run_group.add_argument("--time-ns", type=flag(POSITIVE), default=1.0, metavar="T",
                           help="recorded simulation time in ns (default 1)")
    run_group.add_argument("--save-every-ps", type=flag(POSITIVE), default=1.0, metavar="P",
                           help="time between saved frames in ps (default 1)")
    run_group.add_argument("--timestep-fs", type=flag(POSITIVE), default=None, metavar="FS",
                           help="time step in fs (default 1; 2 with --constraints hbonds or --hmr alone; 4 with both)")
    run_group.add_argument("--friction-per-ps", type=flag(NON_NEGATIVE), default=1.0, metavar="G",
                           help="Langevin friction in 1/ps (default 1)")
    run_group.add_argument("--equilibration-ps", type=flag(NON_NEGATIVE), default=10.0, metavar="P",
                           help="unrecorded dynamics after minimisation, in ps (default 10)")
    run_group.add_argument("--seed", type=flag(SEED), default=0, help="random seed: same seed, same run (default 0)")
    run_group.add_argument("--platform", default="auto",
                           help="OpenMM platform: auto (default; Reference for small vacuum systems, else "
                                "CUDA > OpenCL > CPU), or a name such as CUDA, CPU, Reference")
    run_group.add_argument("--no-progress", action="store_true", help="no progress bar")

    replicas = parser.add_argument_group("replicas (independent runs in parallel processes, one dataset)")
    replicas.add_argument("--replicas", type=flag(POSITIVE_INT), default=None, metavar="N",
                          help="number of independent replicas, each --time-ns long (default: one plain run)")
    replicas.add_argument("--workers", type=flag(POSITIVE_INT), default=None, metavar="K",
                          help="replicas run at once, each in its own process (one CPU thread each) (default 1; "
                               "more workers than replicas is allowed, the extra ones stay idle)")
    replicas.add_argument("--starts", default=None, metavar="KIND[,KIND]",
                          help="start structures cycled over the replicas: input (the minimised input), unfolded "
                               "(after --unfold-ps at --unfold-temperature) (default: input,unfolded)")
    replicas.add_argument("--unfold-ps", type=flag(POSITIVE), default=None, metavar="P",
                          help="length of the unfolding run of an unfolded start, ps (default 100)")
    replicas.add_argument("--unfold-temperature", type=flag(POSITIVE), default=None, metavar="K",
                          help="its temperature, K (default 600)")
    replicas.add_argument("--keep-parts", action="store_true",
                          help="keep OUT.parts/ (one file per replica) after writing OUT, e.g. to add replicas later")

    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, metavar="DATA.npz", help="dataset file to write")
    output.add_argument("--dcd", metavar="TRAJ.dcd", help="also write the saved frames as a DCD trajectory "
                                                         "(not with --replicas)")
    output.add_argument("--save-cg", choices=list(MAPPING_PRESETS), default=None, metavar="MAPPING",
                        help=f"store CG frames only: bead positions and mapped forces of this mapping "
                             f"({', '.join(MAPPING_PRESETS)}) instead of every atom")


def _source(args: argparse.Namespace) -> str:
    """One line saying where the data came from (stored in the dataset)."""
    inputs = [f"--{name} {' '.join(v) if isinstance(v, list) else v}"
              for name in ("system", "pdb", "forcefield", "prmtop", "inpcrd", "psf", "crd", "toppar", "top", "gro")
              if (v := getattr(args, name)) is not None] or ["--system alanine-dipeptide"]
    extra = f" --hmr --hydrogen-mass {args.hydrogen_mass:g}" if args.hmr else ""
    extra += f" --replicas {args.replicas} --starts {args.starts}" if args.replicas is not None else ""
    extra += f" --save-cg {args.save_cg}" if args.save_cg else ""
    return (f"flowforce md {' '.join(inputs)} --solvent {args.solvent} --constraints {args.constraints}{extra} "
            f"--friction-per-ps {args.friction_per_ps:g} --seed {args.seed}")


#: Options of the replica runner and their defaults (None on the command line: not given).
REPLICA_DEFAULTS = {"workers": 1, "starts": "input,unfolded", "unfold_ps": 100.0, "unfold_temperature": 600.0}


def _resolve(args: argparse.Namespace) -> None:
    """Fill in the defaults that depend on other options; refuse options that do not go together."""
    from openmm_flowforce.md.systems import DEFAULT_HYDROGEN_MASS, default_timestep_fs

    if args.hydrogen_mass is not None and not args.hmr:
        raise OptionError(f"--hydrogen-mass {args.hydrogen_mass:g} applies only with --hmr; add --hmr")
    if args.hmr and args.hydrogen_mass is None:
        args.hydrogen_mass = DEFAULT_HYDROGEN_MASS
    if args.constraints is None:
        args.constraints = "hbonds" if args.hmr else "none"
    if args.timestep_fs is None:
        args.timestep_fs = default_timestep_fs(args.constraints, args.hydrogen_mass if args.hmr else None)
    if args.replicas is None:
        given = [f"--{name.replace('_', '-')}" for name in (*REPLICA_DEFAULTS, "keep_parts") if getattr(args, name)]
        if given:
            raise OptionError(f"{', '.join(given)} apply to replica runs; add --replicas N")
        return
    if args.dcd:
        raise OptionError("--dcd is for a single run; with --replicas every frame is in the --out dataset, "
                          "with the replica of each frame in its replica array: drop --dcd")
    for name, default in REPLICA_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def files(args: argparse.Namespace) -> CommandFiles:
    inputs: dict[str, str | None] = {f"--{name}": getattr(args, name)
                                     for name in ("pdb", "prmtop", "inpcrd", "psf", "crd", "top", "gro")}
    for name in ("toppar", "forcefield"):
        for i, path in enumerate(getattr(args, name) or ()):
            inputs[f"--{name} #{i + 1}"] = path
    folders = {}
    if args.replicas is not None:
        from openmm_flowforce.md.replicas import work_folder

        folders["--out (work folder next to it)"] = work_folder(args.out)
    return CommandFiles(inputs=inputs, outputs={"--out": args.out, "--dcd": args.dcd}, folders=folders,
                        resumable=args.replicas is not None)


def run(args: argparse.Namespace) -> int:
    """Exit code 0: done; 1: the run failed or stopped early; 2: bad input; 130: Ctrl-C (data saved)."""
    from openmm_flowforce.md.systems import load_system

    _resolve(args)
    topology, system, positions = load_system(
        system=args.system, pdb=args.pdb, forcefield=args.forcefield, prmtop=args.prmtop, inpcrd=args.inpcrd,
        psf=args.psf, crd=args.crd, toppar=args.toppar, top=args.top, gro=args.gro,
        solvent=args.solvent, constraints=args.constraints, hydrogen_mass=args.hydrogen_mass if args.hmr else None)
    mapping = None
    if args.save_cg:
        from openmm_flowforce.coordinates.cg_mapping import CGMapping

        mapping = CGMapping.from_topology(topology, args.save_cg)
    if args.replicas is not None:
        return _run_replicas(args, topology, system, positions, mapping)
    return _run_single(args, topology, system, positions, mapping)


def _fail(message: str, code: int) -> int:
    print(f"flowforce md: error: {message}", file=sys.stderr)
    return code


def _run_single(args: argparse.Namespace, topology, system, positions, mapping) -> int:
    from openmm_flowforce.data.dataset import save_dataset
    from openmm_flowforce.md.reference import run_reference_md

    try:
        result = run_reference_md(
            topology, system, positions, temperature=args.temperature, time_ns=args.time_ns,
            save_every_ps=args.save_every_ps, timestep_fs=args.timestep_fs, friction_per_ps=args.friction_per_ps,
            seed=args.seed, platform=args.platform, progress=not args.no_progress, dcd=args.dcd,
            equilibration_ps=args.equilibration_ps)
    except RuntimeError as error:  # no platform could create a context
        return _fail(str(error), 1)

    energies = result["energies"]
    if len(energies) == 0:
        return _fail("no frames were recorded, nothing saved" + (f" ({result['error']})" if result["error"] else ""),
                     130 if result["interrupted"] else 1)
    frames, forces = result["positions"], result["forces"]
    if mapping is not None:
        frames, forces = mapping.map_positions(frames), mapping.map_forces(forces)
    save_dataset(args.out, topology=topology, positions=frames, forces=forces,
                 energies=energies, temperature=result["temperature"], timestep_fs=result["timestep_fs"],
                 save_every_ps=result["save_every_ps"], source=_source(args),
                 system=None if mapping is not None else system, cg_mapping=mapping,
                 provenance={"ns_per_day": {result["platform"]: {"ns_per_day_per_replica": result["ns_per_day"],
                                                                 "replicas": 1,
                                                                 "simulated_ns": result["simulated_ns"]}},
                             "steps": result["steps"], "wall_time_s": result["wall_time_s"]})

    n_atoms = result["positions"].shape[1]
    cg = f" saved as {frames.shape[1]} {args.save_cg} beads" if mapping is not None else ""
    print(f"frames      {len(energies)} x {n_atoms} atoms{cg}, every {result['save_every_ps']:g} ps "
          f"({result['simulated_ns']:g} ns at {result['timestep_fs']:g} fs, {result['temperature']:g} K)")
    print(f"energy      {energies.mean():.2f} ± {energies.std():.2f} kJ/mol (minimum start: "
          f"{result['minimized_energy']:.2f})")
    print(f"platform    {result['platform']}, wall time {result['wall_time_s']:.1f} s, "
          f"{result['ns_per_day']:.1f} ns/day")
    print(f"wrote       {args.out}" + (f" and {args.dcd}" if args.dcd else ""))
    if result["interrupted"]:
        print(f"flowforce md: interrupted (Ctrl-C); the {len(energies)} frames recorded so far were saved to "
              f"{args.out}", file=sys.stderr)
        return 130
    if result["error"]:
        return _fail(f"{result['error']}; the {len(energies)} frames before it were saved", 1)
    return 0


def _run_replicas(args: argparse.Namespace, topology, system, positions, mapping) -> int:
    from openmm_flowforce.md.replicas import (ReplicaPlan, ReplicaSettings, assemble_dataset, remove_work_folder,
                                              run_missing_replicas)

    settings = ReplicaSettings(
        temperature=args.temperature, time_ns=args.time_ns, save_every_ps=args.save_every_ps,
        timestep_fs=args.timestep_fs, friction_per_ps=args.friction_per_ps, equilibration_ps=args.equilibration_ps,
        seed=args.seed, starts=tuple(name.strip() for name in args.starts.split(",")),
        unfold_ps=args.unfold_ps, unfold_temperature=args.unfold_temperature)
    plan = ReplicaPlan(topology, system, positions, args.replicas, settings, args.out, mapping=mapping,
                       workers=args.workers, platform=args.platform, source=_source(args))
    try:
        report = run_missing_replicas(plan, progress=not args.no_progress)
    except KeyboardInterrupt as stop:
        how = "SIGTERM" if stop.args and stop.args[0] == "SIGTERM" else "Ctrl-C"
        done = args.replicas - len(plan.missing())
        print(f"flowforce md: interrupted ({how}); {done} of {args.replicas} replicas are finished and kept in "
              f"{plan.folder}; run the same command again to run the other {args.replicas - done}", file=sys.stderr)
        return 130
    except RuntimeError as error:  # no platform could create a context
        return _fail(str(error), 1)
    if report["failed"]:
        failed = "; ".join(f"replica {i}: {message}" for i, message in sorted(report["failed"].items()))
        return _fail(f"{len(report['failed'])} of {args.replicas} replicas failed ({failed}); the finished ones are "
                     f"kept in {plan.folder}: the same command retries only the failed ones (after changing an "
                     f"option, delete {plan.folder} first)", 1)
    provenance = assemble_dataset(plan, report)
    if not args.keep_parts:
        remove_work_folder(plan)

    starts = provenance["replicas"]
    frames = sum(r["frames"] for r in starts)
    kinds = ", ".join(f"{sum(r['start'] == k for r in starts)} {k}" for k in dict.fromkeys(r["start"] for r in starts))
    speeds = ", ".join(f"{name} {speed['ns_per_day_per_replica']:.1f} ns/day per replica"
                       for name, speed in provenance["ns_per_day"].items())
    if "session" in provenance:
        session = provenance["session"]
        speeds += (f", {session['ns_per_day_all_workers']:.1f} ns/day overall with {args.workers} worker(s) "
                   "(minimisation and start-up included)")
    what = f"{mapping.n_beads} {args.save_cg} beads" if mapping is not None else f"{system.getNumParticles()} atoms"
    print(f"replicas    {args.replicas} ({kinds}): {len(report['ran'])} run now, {len(report['already_done'])} "
          "already done")
    print(f"frames      {frames} x {what}, every {args.save_every_ps:g} ps ({args.time_ns:g} ns per replica at "
          f"{args.timestep_fs:g} fs, {args.temperature:g} K)")
    print(f"speed       {speeds}")
    print(f"wrote       {args.out}" + (f" (parts kept in {plan.folder})" if args.keep_parts else ""))
    return 0
