"""Chignolin (CLN025) end to end: reference MD → flow-matching CG and force-matching CG → CG MD
in OpenMM → protein evaluation (issue 14 §4; Köhler et al., JCTC 2023, arXiv 2203.11167).

    python bench/bench_chignolin.py --workdir chig                 # CPU budget (see BENCHMARKS.md)
    python bench/bench_chignolin.py --workdir chig --replicas 32 --workers 16 --time-ns 2   # GPU/many cores
    python bench/bench_chignolin.py --workdir chig_quick --quick   # does the script run (minutes)

Every stage is a ``flowforce`` command, so this is the path a user takes:

1. ``flowforce md``: amber14 + GBn2, HMR at 4 fs, ``--temperature`` (340 K by default, near
   CLN025's melting temperature so that both states are populated), ``--replicas`` started
   alternately from the folded hairpin and from unfolded structures made at 600 K, ``--workers``
   processes. Resumable (finished replicas are kept in ``ref.npz.parts/``).
2. ``flowforce cg`` on the Cα beads, once by flow-matching (positions only) and once by force
   matching (mapped all-atom forces), ``--net`` (default schnet). Resumable.
3. ``flowforce export --compile`` and ``flowforce simulate --backend native`` (5 fs Langevin).
4. ``flowforce evaluate --protein`` against the reference, folded structure PDB 5AWL
   (``bench/data/5awl_cln025.pdb``): Q, Cα-RMSD, folded fraction, TICA and (Q, RMSD)
   surfaces and their JS divergences, folding/unfolding events, plots.
5. The reference's own convergence: the same evaluation between its two halves of replicas
   (even vs odd replica index); when that JS is not far below the CG model's, the reference
   is not converged enough to rank models.

A stage whose output exists is skipped, so an interrupted run continues where it stopped.
Results: ``WORKDIR/results.json`` and a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FOLDED = HERE / "data" / "5awl_cln025.pdb"
HAIRPIN = HERE.parent / "tests" / "data" / "cln025_hairpin.pdb"


def flowforce(*args: str, log: Path, may_fail: bool = False) -> bool:
    """Run one ``flowforce`` command, its output appended to ``log``; stop the benchmark on failure
    unless ``may_fail`` (then return whether it succeeded)."""
    command = [sys.executable, "-m", "openmm_flowforce.cli.main", *map(str, args)]
    print("$ flowforce " + " ".join(map(str, args)), flush=True)
    with open(log, "a") as stream:
        stream.write("$ flowforce " + " ".join(map(str, args)) + "\n")
        stream.flush()
        done = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT)
    if done.returncode != 0 and not may_fail:
        sys.exit(f"bench_chignolin: stage failed (exit {done.returncode}); see {log}")
    return done.returncode == 0


def split_by_replica(reference: Path, work: Path) -> tuple[Path, Path] | None:
    """Two datasets from the even and the odd replicas of ``reference`` (None with one replica)."""
    from openmm_flowforce.data.dataset import load_dataset, save_dataset, topology_from_pdb_text

    halves = (work / "ref_even.npz", work / "ref_odd.npz")
    if all(path.exists() for path in halves):
        return halves
    data = load_dataset(reference)
    if data.replica is None or len(np.unique(data.replica)) < 2:
        return None
    for parity, path in enumerate(halves):
        keep = data.replica % 2 == parity
        save_dataset(path, topology=data.topology, positions=data.positions[keep], energies=data.energies[keep],
                     temperature=data.temperature, forces=None if data.forces is None else data.forces[keep],
                     save_every_ps=data.save_every_ps, source=f"{reference.name}, {'odd' if parity else 'even'} replicas",
                     replica=data.replica[keep], cg_mapping=data.mapping())
    return halves


def speed_from_report(csv: Path) -> float:
    """ns/day from the last line of a ``flowforce simulate --report`` CSV."""
    lines = [line for line in csv.read_text().splitlines() if line]
    header = [name.strip('#"') for name in lines[0].split(",")]
    column = next(i for i, name in enumerate(header) if name.startswith("Speed"))
    return float(lines[-1].split(",")[column])


def summary(report: dict, all_atom_ns_per_day: float | None) -> dict:
    """The numbers the BENCHMARKS.md row quotes, from one ``evaluate --protein`` report."""
    ensembles = report["ensembles"]
    row = {"folded_fraction_reference": ensembles["reference"]["folded_fraction"]["value"],
           "folded_fraction_reference_stderr": ensembles["reference"]["folded_fraction"]["stderr"],
           "folded_fraction_model": ensembles["model"]["folded_fraction"]["value"],
           "folded_fraction_model_stderr": ensembles["model"]["folded_fraction"]["stderr"],
           "events_reference": ensembles["reference"]["events"], "events_model": ensembles["model"]["events"],
           "js_tica": report["surfaces"]["tica"]["divergences_nats"]["js"],
           "js_q_rmsd": report["surfaces"]["q_rmsd"]["divergences_nats"]["js"]}
    if "cg_ns_per_day" in report:
        row["cg_ns_per_day"] = report["cg_ns_per_day"]
        if all_atom_ns_per_day:
            row["speedup_vs_all_atom_per_core"] = report["cg_ns_per_day"] / all_atom_ns_per_day
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="chignolin")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--time-ns", type=float, default=0.25, help="recorded ns per replica")
    parser.add_argument("--save-every-ps", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=340.0)
    parser.add_argument("--unfold-ps", type=float, default=100.0, help="600 K run that makes an unfolded start")
    parser.add_argument("--equilibration-ps", type=float, default=10.0)
    parser.add_argument("--methods", nargs="+", default=["flow-matching", "force-matching"])
    parser.add_argument("--net", default="schnet", help="CG net (flowforce cg --net)")
    parser.add_argument("--cg-config", metavar="FILE.yaml", help="flowforce cg --config for every method")
    parser.add_argument("--cg-steps", type=int, default=200_000, help="CG MD steps at 5 fs")
    parser.add_argument("--backend", default="native", help="flowforce simulate --backend")
    parser.add_argument("--platform", default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    args = parser.parse_args()
    if args.quick:
        args.replicas, args.workers, args.time_ns, args.cg_steps = 2, min(args.workers, 2), 0.004, 2000
        args.save_every_ps, args.unfold_ps, args.equilibration_ps = 0.1, 2.0, 1.0

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    reference = work / "ref.npz"
    results: dict = {"command": " ".join(sys.argv), "settings": vars(args), "methods": {}}

    if not reference.exists():
        flowforce("md", "--pdb", HAIRPIN, "--solvent", "gbn2", "--hmr", "--temperature", args.temperature,
                  "--replicas", args.replicas, "--workers", args.workers, "--starts", "input,unfolded",
                  "--unfold-ps", args.unfold_ps, "--equilibration-ps", args.equilibration_ps,
                  "--time-ns", args.time_ns, "--save-every-ps", args.save_every_ps, "--no-progress",
                  "--out", reference, log=log)
    from openmm_flowforce.data.dataset import load_dataset
    data = load_dataset(reference)
    runs = list((data.provenance or {}).get("replicas", []))
    results["reference"] = {"frames": int(data.n_frames), "replicas": len(np.unique(data.replica)) if data.replica
                            is not None else 1, "ns_total": data.n_frames * (data.save_every_ps or 0) / 1000,
                            "provenance": data.provenance}
    all_atom_ns_day = [run.get("ns_per_day") for run in runs if run.get("ns_per_day")]
    results["reference"]["ns_per_day_per_replica"] = float(np.median(all_atom_ns_day)) if all_atom_ns_day else None

    def evaluate(model: Path, out: Path, *extra) -> dict:
        if not out.exists():
            flowforce("evaluate", "--protein", model, *extra, "--reference", reference, "--folded", FOLDED,
                      "--out", out, "--plots", out.with_suffix(""), log=log)
        return json.loads(out.read_text())

    halves = split_by_replica(reference, work)
    if halves is not None:
        even, odd = halves
        if not (work / "ref_halves.json").exists():
            flowforce("evaluate", "--protein", odd, "--reference", even, "--folded", FOLDED,
                      "--out", work / "ref_halves.json", log=log)
        results["reference_halves"] = json.loads((work / "ref_halves.json").read_text())

    for method in args.methods:
        folder = work / method
        folder.mkdir(exist_ok=True)
        ckpt, package, dcd, csv = (folder / name for name in ("cg.ckpt", "cg.pt2", "cg.dcd", "cg.csv"))
        started = time.perf_counter()
        if not (folder / "cg.pdb").exists() or not ckpt.exists():
            cg_args = (["--quick"] if args.quick else []) + (["--config", args.cg_config] if args.cg_config else [])
            flowforce("cg", reference, "--mapping", "ca", "--method", method, "--net", args.net, "--quiet",
                      *cg_args, "--out", ckpt, log=log)
        if not package.exists():
            # one thread: the CG speed is compared per core with the all-atom replicas
            flowforce("export", ckpt, "--out", package.with_suffix(".pt"), "--compile", "--threads", 1, log=log)
        if not dcd.exists():
            partial = folder / "cg.partial.dcd"
            ok = flowforce("simulate", package, "--topology", folder / "cg.pdb", "--backend", args.backend,
                           "--platform", args.platform, "--steps", args.cg_steps, "--timestep-fs", 5,
                           "--temperature", args.temperature, "--report", csv, "--report-interval",
                           max(args.cg_steps // 5000, 1) * 10, "--out", partial, log=log, may_fail=True)
            if not ok:  # a CG model that blows up is a result too: say so and go on with the next
                lines = log.read_text().strip().splitlines()
                results["methods"][method] = {"failed": lines[-1] if lines else "flowforce simulate failed"}
                print(f"{method}: CG MD failed: {results['methods'][method]['failed']}")
                continue
            os.replace(partial, dcd)
        report = evaluate(dcd, folder / "report.json", "--topology", folder / "cg.pdb")
        report["cg_ns_per_day"] = speed_from_report(csv)
        report["wall_time_s"] = time.perf_counter() - started
        results["methods"][method] = report

    aa = results["reference"]["ns_per_day_per_replica"]
    print(f"\nreference: {results['reference']['frames']} frames, {results['reference']['ns_total']:.2f} ns "
          f"in {results['reference']['replicas']} replicas; all-atom GBn2 {aa} ns/day per replica")
    rows = [("reference halves", results.get("reference_halves"))] + list(results["methods"].items())
    results["summary"] = {name: summary(report, aa) if "failed" not in report else report
                          for name, report in rows if report is not None}
    for name, row in results["summary"].items():
        print(f"{name:>18}: {json.dumps(row)}")
    (work / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
