"""``flowforce simulate``: Langevin MD (or ESH dynamics) of a molecule under its flow potential;
the run lives in :mod:`openmm_flowforce.md.simulate`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from openmm_flowforce.cli.config import CommandFiles, flag, legacy_user_errors
from openmm_flowforce.options import NON_NEGATIVE, POSITIVE, POSITIVE_INT, Option

#: As :data:`openmm_flowforce.md.simulate.PLATFORMS` (not imported: it would pull in torch
#: for every ``flowforce --help``); a test keeps the two equal.
PLATFORMS = ("auto", "CUDA", "OpenCL", "CPU", "Reference")
#: As :data:`openmm_flowforce.md.simulate.INTEGRATORS` (a test keeps the two equal).
INTEGRATORS = ("langevin", "esh")

HELP = "run Langevin MD with a learned flow potential and write a DCD trajectory"

EPILOG = """\
Units: timestep fs, temperature K; energies in the log kJ/mol. Every report interval the
run checks that the energy is finite and has not exploded; if it has, it stops, writes the
last good positions to TRAJ.last_good.pdb and exits with status 1.

Example:
  flowforce simulate model.pt --topology molecule.pdb --steps 10000 --out traj.dcd --report log.csv

ESH dynamics (--integrator esh; Ver Steeg & Galstyan 2021, arXiv 2111.02434) is a sampler,
not physical MD: each step moves the molecule --esh-step nm along a unit direction, the
"velocities" are that direction, and the log's kinetic energy is ESH's log-speed term.
Frames sample the Boltzmann distribution only when weighted: TRAJ.esh_weights.csv holds,
per frame, log_weight (use w ∝ exp(log_weight)) and the conserved ESH energy.
  flowforce simulate model.pt --topology molecule.pdb --steps 10000 --out traj.dcd --integrator esh
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("model", metavar="MODEL.pt", help="exported model (flowforce export) or a model checkpoint")
    parser.add_argument("--topology", required=True, metavar="TOP.pdb",
                        help="PDB of the molecule, atoms in the model's order; its positions start the run")
    parser.add_argument("--steps", required=True, type=flag(POSITIVE_INT), metavar="N", help="number of MD steps")
    parser.add_argument("--out", required=True, metavar="TRAJ.dcd", help="DCD trajectory to write")
    parser.add_argument("--report", metavar="LOG.csv", help="also write energies, temperature and speed as CSV")
    parser.add_argument("--report-interval", type=flag(POSITIVE_INT), default=100, metavar="N",
                        help="steps between frames, log lines and stability checks (default: 100)")
    parser.add_argument("--platform", default="auto", choices=PLATFORMS,
                        help="OpenMM platform (default: auto, the fastest available)")
    parser.add_argument("--backend", default="auto", choices=["auto", "torchforce", "pythonforce", "native"],
                        help="how OpenMM runs the model (default: auto = torchforce where openmm-torch works)")
    parser.add_argument("--timestep-fs", type=flag(POSITIVE), default=1.0, metavar="FS",
                        help="time step in fs (default: 1)")
    parser.add_argument("--temperature", type=flag(POSITIVE), default=None, metavar="K",
                        help="temperature in K (default: the one the model was exported at; 300 for checkpoints)")
    parser.add_argument("--friction", type=flag(NON_NEGATIVE), default=1.0, metavar="PER_PS",
                        help="Langevin friction in 1/ps (default: 1)")
    parser.add_argument("--seed", type=flag(Option(int, minimum=0, maximum=2**31 - 2)), default=0,
                        help="seed of velocities and Langevin noise (default: 0)")
    parser.add_argument("--integrator", default="langevin", choices=INTEGRATORS,
                        help="langevin (default) or esh (a sampler: frames need the weights in "
                             "TRAJ.esh_weights.csv; --timestep-fs and --friction are then unused)")
    parser.add_argument("--esh-step", type=flag(POSITIVE), default=0.005, metavar="NM",
                        help="ESH step: nm the whole molecule moves per step (default: 0.005)")
    parser.add_argument("--esh-refresh", type=flag(Option(int, minimum=0)), default=100, metavar="N",
                        help="ESH: redraw the direction every N steps (0: never; default: 100)")
    parser.add_argument("--torch-threads", type=flag(POSITIVE_INT), default=1, metavar="N",
                        help="torch intra-op threads (default: 1, fastest for one small molecule; more threads "
                             "compete with OpenMM's own for the cores)")


def files(args: argparse.Namespace) -> CommandFiles:
    out = Path(args.out)
    return CommandFiles(inputs={"MODEL.pt": args.model, "--topology": args.topology},
                        outputs={"--out": out, "--report": args.report,
                                 "--out (ESH weights)": (out.with_name(out.stem + ".esh_weights.csv")
                                                         if args.integrator == "esh" else None),
                                 "--out (last good state on a blow-up)": out.with_name(out.stem + ".last_good.pdb")})


def run(args: argparse.Namespace) -> int:
    """Exit code 0 on success, 1 when the simulation blew up, 2 on bad input."""
    import torch

    from openmm_flowforce.md.simulate import SimulationBlewUp, simulate

    torch.set_num_threads(args.torch_threads)
    try:
        with legacy_user_errors():
            result = simulate(args.model, args.topology, args.steps, args.out, platform=args.platform,
                              timestep_fs=args.timestep_fs, temperature=args.temperature, backend=args.backend,
                              seed=args.seed, report=args.report, report_interval=args.report_interval,
                              friction_per_ps=args.friction, integrator=args.integrator,
                              esh_step_nm=args.esh_step, esh_refresh=args.esh_refresh)
    except SimulationBlewUp as error:
        print(f"flowforce simulate: {error}", file=sys.stderr)
        return 1
    if args.integrator == "esh":
        print(f"ESH frames need weights: exp(log_weight) from {result.trajectory.with_name(result.trajectory.stem)}"
              ".esh_weights.csv")
    print(f"wrote {result.trajectory}: {result.steps} steps at {result.temperature:g} K on {result.platform} "
          f"({result.backend}), {result.us_per_step:.0f} µs/step; final potential energy "
          f"{result.final_potential_energy:.6g} kJ/mol")
    return 0
