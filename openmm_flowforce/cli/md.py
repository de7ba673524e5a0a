"""``flowforce md``: argument parsing and printing; the work lives in :mod:`openmm_flowforce.md`."""
from __future__ import annotations

import argparse
import sys

from openmm_flowforce.cli.config import CommandFiles, flag
from openmm_flowforce.options import NON_NEGATIVE, POSITIVE, SEED

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

Example (about 10 s on one core; implicit solvent is ~30x slower):
  flowforce md --system alanine-dipeptide --time-ns 1 --save-every-ps 1 --out ala.npz
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from openmm_flowforce.md.systems import BUILTIN_SYSTEMS, CONSTRAINTS, SOLVENTS

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
                        help="vacuum, or implicit (OBC2 generalized Born) (default: vacuum)")
    system.add_argument("--constraints", choices=list(CONSTRAINTS), default="none",
                        help="none (default): every bond flexible, as a flow that models all coordinates "
                             "needs; hbonds: rigid bonds to hydrogen, allows --timestep-fs 2")

    run_group = parser.add_argument_group("simulation")
    run_group.add_argument("--temperature", type=flag(POSITIVE), default=300.0, metavar="K",
                           help="kelvin (default 300)")
    run_group.add_argument("--time-ns", type=flag(POSITIVE), default=1.0, metavar="T",
                           help="recorded simulation time in ns (default 1)")
    run_group.add_argument("--save-every-ps", type=flag(POSITIVE), default=1.0, metavar="P",
                           help="time between saved frames in ps (default 1)")
    run_group.add_argument("--timestep-fs", type=flag(POSITIVE), default=None, metavar="FS",
                           help="time step in fs (default 1; 2 with --constraints hbonds)")
    run_group.add_argument("--friction-per-ps", type=flag(NON_NEGATIVE), default=1.0, metavar="G",
                           help="Langevin friction in 1/ps (default 1)")
    run_group.add_argument("--equilibration-ps", type=flag(NON_NEGATIVE), default=10.0, metavar="P",
                           help="unrecorded dynamics after minimisation, in ps (default 10)")
    run_group.add_argument("--seed", type=flag(SEED), default=0, help="random seed: same seed, same run (default 0)")
    run_group.add_argument("--platform", default="auto",
                           help="OpenMM platform: auto (default; Reference for small vacuum systems, else "
                                "CUDA > OpenCL > CPU), or a name such as CUDA, CPU, Reference")
    run_group.add_argument("--no-progress", action="store_true", help="no progress bar")

    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, metavar="DATA.npz", help="dataset file to write")
    output.add_argument("--dcd", metavar="TRAJ.dcd", help="also write the saved frames as a DCD trajectory")


def _source(args: argparse.Namespace) -> str:
    """One line saying where the data came from (stored in the dataset)."""
    inputs = [f"--{name} {' '.join(v) if isinstance(v, list) else v}"
              for name in ("system", "pdb", "forcefield", "prmtop", "inpcrd", "psf", "crd", "toppar", "top", "gro")
              if (v := getattr(args, name)) is not None] or ["--system alanine-dipeptide"]
    return (f"flowforce md {' '.join(inputs)} --solvent {args.solvent} --constraints {args.constraints} "
            f"--friction-per-ps {args.friction_per_ps:g} --seed {args.seed}")


def files(args: argparse.Namespace) -> CommandFiles:
    inputs: dict[str, str | None] = {f"--{name}": getattr(args, name)
                                     for name in ("pdb", "prmtop", "inpcrd", "psf", "crd", "top", "gro")}
    for name in ("toppar", "forcefield"):
        for i, path in enumerate(getattr(args, name) or ()):
            inputs[f"--{name} #{i + 1}"] = path
    return CommandFiles(inputs=inputs, outputs={"--out": args.out, "--dcd": args.dcd})


def run(args: argparse.Namespace) -> int:
    """Exit code 0: done; 1: the run failed or stopped early; 2: bad input; 130: Ctrl-C (data saved)."""
    from openmm_flowforce.data.dataset import save_dataset
    from openmm_flowforce.md.reference import run_reference_md
    from openmm_flowforce.md.systems import load_system

    def fail(message: str, code: int) -> int:
        print(f"flowforce md: error: {message}", file=sys.stderr)
        return code

    topology, system, positions = load_system(
        system=args.system, pdb=args.pdb, forcefield=args.forcefield, prmtop=args.prmtop, inpcrd=args.inpcrd,
        psf=args.psf, crd=args.crd, toppar=args.toppar, top=args.top, gro=args.gro,
        solvent=args.solvent, constraints=args.constraints)
    try:
        result = run_reference_md(
            topology, system, positions, temperature=args.temperature, time_ns=args.time_ns,
            save_every_ps=args.save_every_ps, timestep_fs=args.timestep_fs, friction_per_ps=args.friction_per_ps,
            seed=args.seed, platform=args.platform, progress=not args.no_progress, dcd=args.dcd,
            equilibration_ps=args.equilibration_ps)
    except RuntimeError as error:  # no platform could create a context
        return fail(str(error), 1)

    energies = result["energies"]
    if len(energies) == 0:
        return fail("no frames were recorded, nothing saved" + (f" ({result['error']})" if result["error"] else ""),
                    130 if result["interrupted"] else 1)
    save_dataset(args.out, topology=topology, positions=result["positions"], forces=result["forces"],
                 energies=energies, temperature=result["temperature"], timestep_fs=result["timestep_fs"],
                 save_every_ps=result["save_every_ps"], source=_source(args), system=system)

    n_atoms = result["positions"].shape[1]
    print(f"frames      {len(energies)} x {n_atoms} atoms, every {result['save_every_ps']:g} ps "
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
        return fail(f"{result['error']}; the {len(energies)} frames before it were saved", 1)
    return 0
