"""Speed of protein reference MD: chignolin (CLN025, 175 atoms) in GBn2 implicit solvent with
hydrogen-mass repartitioning (1.5 Da) and rigid X–H bonds at 4 fs, run as parallel replicas.

    nice -n 10 python bench/bench_md_replicas.py [--pdb ../shared/data/cln025/cln025.pdb] \
        [--platforms Reference CPU] [--workers 1 2] [--replicas 2] [--ps Reference=2 CPU=4] \
        [--json bench/results/bench_md_replicas.json]

Each row runs ``--replicas`` replicas started from the (minimised) input of the given length through the code
``flowforce md --replicas N --workers K`` uses (:mod:`openmm_flowforce.md.replicas`), one
CPU thread per replica, and reports

* ns/day per replica: production time simulated / production wall time of each replica
  (what one worker achieves);
* ns/day overall: all replicas' production time / wall time of the whole call, including
  the one minimisation, process start-up (torch and openmm imports in every worker) and
  writing the parts: what a user gets from such a short run. For long runs it tends to
  per-replica speed × workers (while the machine has a free core per worker).
"""
from __future__ import annotations

import argparse
import json
import os
import platform as host
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PDB = ROOT.parent / "shared" / "data" / "cln025" / "cln025.pdb"


def measure(pdb: str, platform: str, workers: int, replicas: int, ps: float) -> dict:
    from openmm_flowforce.md.replicas import ReplicaPlan, ReplicaSettings, run_missing_replicas, assemble_dataset
    from openmm_flowforce.md.systems import DEFAULT_HYDROGEN_MASS, load_system

    topology, system, positions = load_system(pdb=pdb, solvent="gbn2", constraints="hbonds",
                                              hydrogen_mass=DEFAULT_HYDROGEN_MASS)
    settings = ReplicaSettings(temperature=300.0, time_ns=ps / 1000.0, save_every_ps=ps / 10.0, timestep_fs=4.0,
                               equilibration_ps=0.0, starts=("input",))
    with tempfile.TemporaryDirectory() as folder:
        plan = ReplicaPlan(topology, system, positions, replicas, settings, Path(folder) / "bench.npz",
                           workers=workers, platform=platform)
        started = time.perf_counter()
        report = run_missing_replicas(plan, progress=False)
        wall = time.perf_counter() - started
        if report["failed"]:
            raise SystemExit(f"replicas failed: {report['failed']}")
        provenance = assemble_dataset(plan, report)
    infos = provenance["replicas"]
    simulated = sum(info["simulated_ns"] for info in infos)
    return {"platform": platform, "workers": workers, "replicas": replicas, "ps_per_replica": ps,
            "ns_per_day_per_replica": [round(info["ns_per_day"], 2) for info in infos],
            "ns_per_day_overall": round(simulated / wall * 86400.0, 2), "wall_s": round(wall, 1),
            "platform_used": sorted({info["platform"] for info in infos})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pdb", default=str(DEFAULT_PDB))
    parser.add_argument("--platforms", nargs="+", default=["Reference", "CPU"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--ps", nargs="+", default=["Reference=2", "CPU=4"],
                        help="production ps per replica, per platform (NAME=PS)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    lengths = {name: float(ps) for name, ps in (item.split("=") for item in args.ps)}
    rows = []
    for platform in args.platforms:
        for workers in args.workers:
            row = measure(args.pdb, platform, workers, args.replicas, lengths.get(platform, 2.0))
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"host": host.node(), "cpus": os.cpu_count(),
                                               "load_average": os.getloadavg(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
