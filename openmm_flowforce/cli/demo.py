"""``flowforce demo``: the whole flow-matching pipeline on the built-in alanine dipeptide.

A thin script over library functions, kept at the CLI level because it orchestrates every
layer (md, training, export, analysis): reference MD (:func:`~openmm_flowforce.md.reference.run_reference_md`)
→ flow on the backbone beads and flow-matching CG net (:func:`~openmm_flowforce.training.flow_matching.coarse_grain`)
→ export (:func:`~openmm_flowforce.export.torchscript.export_potential`) → CG MD in OpenMM
(:func:`~openmm_flowforce.md.simulate.simulate`) → φ/ψ free-energy comparison
(:mod:`openmm_flowforce.analysis.fes`). Every stage writes its file atomically into DIR and is
skipped when that file is already there, so an interrupted demo continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from openmm_flowforce.cli.config import CommandFiles, legacy_user_errors

HELP = "run the flow-matching pipeline on alanine dipeptide end to end: MD, flow, CG model, CG MD, free energies"

#: Sizes of a full run (about 10 minutes on 2 CPU cores) and of --quick (well under a minute).
SIZES: dict[str, dict[str, Any]] = {
    "full": {"reference_ns": 10.0, "save_every_ps": 0.5, "flow": {"n_layers": 6, "hidden": [64, 64]},
             "flow_steps": 3000, "flow_samples": 30000, "cg_steps": 3000, "cg_md_steps": 200000,
             "cg_md_steps_native": 1000000, "timestep_fs": 5.0, "report_interval": 40},
    "quick": {"reference_ns": 0.2, "save_every_ps": 0.5, "flow": {"n_layers": 2, "hidden": [32, 32],
                                                                   "n_components": 4},
              "flow_steps": 100, "flow_samples": 1000, "cg_steps": 100, "cg_md_steps": 2000,
              "cg_md_steps_native": 2000, "timestep_fs": 5.0, "report_interval": 20},
}

EPILOG = """\
Stages, each skipped when its file in DIR exists (delete a file to redo its stage):
  reference.npz  all-atom Langevin MD of alanine dipeptide in vacuum, 300 K, amber14
                 (full: 10 ns, a frame every 0.5 ps; --quick: 0.2 ns)
  cg.ckpt/.pdb   flow on the 5 backbone beads, flow samples + forces, CG net by force
                 matching on them (flowforce cg --method flow-matching)
  cg.pt          TorchScript export (flowforce export); with the native plugin (--backend
                 native, the default where it loads) also cg.pt2, the AOTInductor package
                 (flowforce export --compile, a minute or more)
  cg.dcd         CG Langevin MD in OpenMM at 5 fs (full: 5 ns through the native plugin,
                 at ~0.1 ms/step; 1 ns through TorchForce, at ~3 ms/step)
  report.json    phi/psi divergences, timings; fes.png: reference | CG model | difference

Example:
  flowforce demo --out demo          # about 10 minutes on 2 cores
  flowforce demo --quick --out demo  # under a minute: a smoke test, not a useful model
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--out", default="flowforce-demo", metavar="DIR",
                        help="folder for every file (default: flowforce-demo); files found there are reused")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test in well under a minute)")
    parser.add_argument("--platform", default="Reference", help="OpenMM platform for both MD runs (default Reference)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--backend", choices=("auto", "native", "torchforce"), default="auto",
                        help="how OpenMM runs the CG model: native (compiled package through the native plugin, "
                             "fast; longer CG MD), torchforce (TorchScript) or auto (native where the plugin loads, "
                             "torchforce for --quick)")


def files(args: argparse.Namespace) -> CommandFiles:
    return CommandFiles(folders={"--out": args.out}, resumable=True)


def _backend(args: argparse.Namespace) -> str:
    """``native`` or ``torchforce`` for the CG MD (``auto``: native where the plugin loads, not for --quick)."""
    if args.backend != "auto":
        return args.backend
    if args.quick:
        return "torchforce"  # compiling the package takes longer than the whole quick demo
    from openmm_flowforce.export.native import native_unavailable

    return "torchforce" if native_unavailable() else "native"


def _stage(timings: dict[str, Any], name: str, path: Path, work) -> None:
    """Run ``work()`` unless ``path`` exists; record its wall time (or that it was reused)."""
    if path.exists():
        timings.setdefault(name, "reused")
        return
    began = time.perf_counter()
    work()
    timings[name] = round(time.perf_counter() - began, 1)


def run(args: argparse.Namespace) -> int:
    """Exit code 0 on success, 1 when a stage fails, 2 on bad input."""
    import torch

    from openmm_flowforce.io import atomic_write_bytes

    torch.set_num_threads(1)
    size = SIZES["quick" if args.quick else "full"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / name for name in ("reference.npz", "cg.ckpt", "cg.pdb", "cg.pt", "cg.pt2", "cg.dcd",
                                           "report.json", "fes.png", "timings.json")}
    backend = _backend(args)
    timings: dict[str, Any] = {}
    if files["timings.json"].exists():  # wall times of the stages an earlier run did
        try:
            timings.update(json.loads(files["timings.json"].read_text()))
        except (OSError, ValueError):  # only wall times: an unreadable file is rewritten
            pass
    progress = not args.quiet

    def save_timings() -> None:
        atomic_write_bytes(files["timings.json"], (json.dumps(timings, indent=1) + "\n").encode())

    def reference() -> None:
        from openmm_flowforce.data.dataset import save_dataset
        from openmm_flowforce.md.reference import run_reference_md
        from openmm_flowforce.md.systems import load_system

        topology, system, positions = load_system(system="alanine-dipeptide")
        result = run_reference_md(topology, system, positions, temperature=300.0, time_ns=size["reference_ns"],
                                  save_every_ps=size["save_every_ps"], seed=0, platform=args.platform,
                                  progress=progress)
        if result["interrupted"] or result["error"]:
            raise RuntimeError(f"reference MD stopped early: {result['error'] or 'interrupted'}")
        save_dataset(files["reference.npz"], topology=topology, positions=result["positions"],
                     forces=result["forces"], energies=result["energies"], temperature=300.0,
                     timestep_fs=result["timestep_fs"], save_every_ps=result["save_every_ps"],
                     source=f"flowforce demo: {size['reference_ns']:g} ns alanine dipeptide, vacuum, 300 K",
                     system=system)

    def coarse_grain() -> None:
        from openmm_flowforce.data.dataset import load_dataset
        from openmm_flowforce.training.flow_matching import coarse_grain as learn

        data = load_dataset(files["reference.npz"])
        options = {"flow": size["flow"], "flow_train": {"steps": size["flow_steps"]},
                   "flow_samples": size["flow_samples"], "cg_train": {"steps": size["cg_steps"]}}
        result = learn(data.positions, data.topology, data.temperature, files["cg.ckpt"], "backbone",
                       "flow-matching", options=options, progress=progress)
        timings["coarse_grain_details"] = {k: result.info[k] for k in (
            "flow_seconds", "sampling_seconds", "cg_seconds", "flow_samples", "dropped_samples",
            "force_threshold_kj_mol_nm", "flow_best_val_nll", "cg_initial_val_loss", "cg_best_val_loss")}

    def export() -> None:
        from openmm_flowforce.export.torchscript import export_potential

        with legacy_user_errors():
            export_potential(files["cg.ckpt"], files["cg.pt"])
            if backend == "native":
                from openmm_flowforce.export.compiled import compile_package

                compile_package(files["cg.ckpt"], files["cg.pt2"], device="cpu", dtype="float32", threads=1)

    def cg_md() -> None:
        from openmm_flowforce.md.simulate import simulate

        partial = out / "cg.partial.dcd"  # renamed when complete: a stopped run is redone, not reused
        native = backend == "native"
        steps = size["cg_md_steps_native" if native else "cg_md_steps"]
        result = simulate(files["cg.pt2" if native else "cg.pt"], files["cg.pdb"], steps, partial,
                          platform=args.platform, timestep_fs=size["timestep_fs"], seed=0,
                          report_interval=size["report_interval"], progress=progress, backend=backend)
        partial.replace(files["cg.dcd"])
        timings["cg_md_us_per_step"] = round(result.us_per_step, 1)

    try:
        for name, path, work in (("reference_md", files["reference.npz"], reference),
                                 ("coarse_grain", files["cg.ckpt"], coarse_grain),
                                 ("export", files["cg.pt2" if backend == "native" else "cg.pt"], export),
                                 ("cg_md", files["cg.dcd"], cg_md)):
            if progress:
                print(f"[demo] {name}: {'reusing ' + str(path) if path.exists() else 'running'}", file=sys.stderr)
            _stage(timings, name, path, work)
            save_timings()
        began = time.perf_counter()
        from openmm_flowforce.analysis.fes import (PHI_PSI, compare_fes, load_trajectory_positions,
                                                   mapped_reference_positions, plot_fes)

        reference_positions = mapped_reference_positions(files["reference.npz"], "backbone")
        model_positions = load_trajectory_positions(files["cg.dcd"], files["cg.pdb"])
        comparison = compare_fes(reference_positions, model_positions, PHI_PSI)
        from openmm_flowforce.analysis.bonded import bonds_of_pdb, compare_bonded, summary_line

        bonded = compare_bonded(reference_positions, model_positions, bonds_of_pdb(files["cg.pdb"]))
        plot_fes(comparison, files["fes.png"], titles=("reference: all-atom MD, mapped", "flow-matching CG model"))
        timings["evaluate"] = round(time.perf_counter() - began, 1)
        report = {**comparison.report(), "bonded": bonded, "sizes": size, "timings_s": timings}
        atomic_write_bytes(files["report.json"], (json.dumps(report, indent=1) + "\n").encode())
        save_timings()
    except RuntimeError as error:
        print(f"flowforce demo: failed: {error}", file=sys.stderr)
        return 1
    d = comparison.divergences
    stage_times = ", ".join(f"{k} {v if isinstance(v, str) else f'{v:g} s'}" for k, v in timings.items()
                            if k in ("reference_md", "coarse_grain", "export", "cg_md", "evaluate"))
    print(f"phi/psi     JS {d['js']:.4f} nats, KL(ref||model) {d['kl']:.4f} nats "
          f"({comparison.frames['reference']} reference / {comparison.frames['model']} CG frames, 36 x 36 bins)")
    print(f"bonded      {summary_line(bonded)} (Wasserstein-1 vs the reference, every term in the report)")
    print(f"timings     {stage_times}")
    print(f"wrote       {files['fes.png']} and {files['report.json']} (and every intermediate file in {out})")
    return 0
