"""FAB on alanine dipeptide from the energy alone, evaluated against reference MD (issue 13 §3).

Midgley et al., "Flow Annealed Importance Sampling Bootstrap", ICLR 2023 (arXiv
2208.01893), Sec. 4.3: a flow on internal coordinates trained by FAB (AIS towards p²/q,
prioritised replay buffer) from the OpenMM energy alone. Here the flow is the package's
Boltzmann generator (smooth coupling flow on internal coordinates, ``flow: internal``),
normalised from the force field and the built-in PDB structure; no MD frame is used for
training. MD is only the yardstick.

Stages (each resumable; re-running the same command continues where it stopped):

1. ``reference``: ``flowforce md`` of the same System (vacuum or OBC2) → WORK/reference.npz.
2. ``train``: ``flowforce sampler train --method fab`` in chunks of ``--eval-every`` steps
   (the engine resumes the checkpoint exactly); after each chunk ``--n-eval`` flow samples
   are compared with the reference: φ/ψ JS raw and reweighted, ESS, φ > 0 population,
   bond/angle W1 (:mod:`openmm_flowforce.analysis.molecule_sampler`). The curve (one row
   per chunk, keyed by step) is WORK/curve.json; chunks already evaluated are skipped.
3. ``report``: curve PNG (JS vs energy evaluations), the last Ramachandran/energy plot and
   a JSON summary in ``--results``.

    python bench/bench_fab_alanine.py --quick                       # ~3 min on one core
    python bench/bench_fab_alanine.py --ais-space cartesian         # HMC on Cartesian nm (the first runs)
    python bench/bench_fab_alanine.py --solvent implicit --steps 200 --eval-every 50
    python bench/bench_fab_alanine.py --solvent implicit --steps 20000 --eval-every 500 \\
        --reference-ns 50        # the long run; the same command resumes it

Not a test.
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

ROOT = Path(__file__).resolve().parents[1]
#: FAB options beyond the method defaults. Batch 128 and a 1024-point buffer (filled from
#: 8 AIS batches of the initial flow) as the package's FAB defaults; 2 intermediate AIS
#: levels with 1 HMC transition of 5 leapfrog steps each keep a step ~2 s on one core.
FAB_OPTIONS = {"batch_size": 128, "min_buffer": 1024, "buffer_size": 8192, "n_intermediate": 2,
               "checkpoint_every": 10, "log_every": 5}
QUICK_OPTIONS = {"batch_size": 64, "min_buffer": 128, "buffer_size": 1024, "n_intermediate": 2,
                 "checkpoint_every": 5, "log_every": 1}


def _run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env)


def reference(work: Path, solvent: str, ns: float) -> Path:
    out = work / "reference.npz"
    if not out.exists():
        _run(["flowforce", "md", "--system", "alanine-dipeptide", "--solvent", solvent, "--time-ns", str(ns),
              "--save-every-ps", "1", "--platform", "Reference" if solvent == "vacuum" else "CPU",
              "--no-progress", "--out", str(out)])
    return out


def train_and_evaluate(work: Path, target: str, steps: int, every: int, n_eval: int, options: dict,
                       reference_positions: np.ndarray) -> list[dict]:
    import yaml

    from openmm_flowforce.analysis.molecule_sampler import evaluate_molecule_sampler
    from openmm_flowforce.samplers.common import import_methods, load_sampler

    import_methods()
    config = work / "fab.yaml"
    config.write_text(yaml.safe_dump({"options": options}))
    curve_path = work / "curve.json"
    curve = json.loads(curve_path.read_text()) if curve_path.exists() else []
    done = {row["steps"] for row in curve}
    checkpoint = work / "fab.ckpt"
    if 0 not in done:  # the untrained flow, built exactly as the method builds it (same seed)
        from openmm_flowforce.samplers import get_method
        from openmm_flowforce.samplers.common import make_target

        method, target_object = get_method("fab"), make_target(target)
        model = method.build(target_object, method.options(options))
        report = evaluate_molecule_sampler(method, model, target_object, reference_positions, n_eval, seed=0)
        curve.append({"steps": 0, "energy_evaluations": 0, "train_wall_time_s": 0.0, **report})
        curve.sort(key=lambda r: r["steps"])
        curve_path.write_text(json.dumps(curve, indent=1) + "\n")
    for stop in range(every, steps + 1, every):
        if stop in done:
            continue
        _run(["flowforce", "sampler", "train", "--target", target, "--method", "fab", "--out", str(checkpoint),
              "--steps", str(stop), "--config", str(config), "--quiet"])
        loaded = load_sampler(checkpoint)
        start = time.perf_counter()
        report = evaluate_molecule_sampler(loaded.method, loaded.model, loaded.target, reference_positions, n_eval,
                                           seed=stop, plot=work / "last.png",
                                           title=f"FAB on {target}: {stop} steps")
        summary = loaded.checkpoint["summary"]
        row = {"steps": stop, "energy_evaluations": summary["energy_evaluations"],
               "train_wall_time_s": summary["wall_time_s"], "eval_wall_time_s": time.perf_counter() - start, **report}
        curve.append(row)
        curve.sort(key=lambda r: r["steps"])
        curve_path.write_text(json.dumps(curve, indent=1) + "\n")
        print(f"step {stop}: {row['energy_evaluations']:,} energy evaluations, JS raw "
              f"{report['raw']['js_phi_psi']:.3f}, reweighted {report['reweighted']['js_phi_psi']:.3f}, "
              f"ESS {report['ess']:.4f}", flush=True)
    return curve


def plot_curve(curve: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    untrained = [r for r in curve if r["energy_evaluations"] == 0]
    curve = [r for r in curve if r["energy_evaluations"] > 0]  # log axis: the untrained flow as a line
    evals = [r["energy_evaluations"] for r in curve]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if untrained:
        axes[0].axhline(untrained[0]["raw"]["js_phi_psi"], color="C0", ls="--", lw=1, label="untrained flow")
        axes[0].axhline(untrained[0]["reweighted"]["js_phi_psi"], color="C1", ls="--", lw=1,
                        label="untrained, reweighted")
    axes[0].plot(evals, [r["raw"]["js_phi_psi"] for r in curve], "o-", label="flow samples")
    axes[0].plot(evals, [r["reweighted"]["js_phi_psi"] for r in curve], "s-", label="reweighted")
    axes[0].axhline(0.02, color="k", ls=":", label="aim 0.02")
    axes[0].set(xscale="log", yscale="log", xlabel="target energy evaluations", ylabel="φ/ψ JS (nats)", title=title)
    axes[0].legend()
    axes[1].plot(evals, [max(r["ess"], 1e-6) for r in curve], "o-")
    axes[1].set(xscale="log", yscale="log", xlabel="target energy evaluations", ylabel="Kish ESS / n",
                title="importance weights p/q")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--solvent", choices=("vacuum", "implicit"), default="vacuum")
    parser.add_argument("--steps", type=int, default=60, help="FAB steps in all (default 60)")
    parser.add_argument("--eval-every", type=int, default=20, help="evaluate after every N steps (default 20)")
    parser.add_argument("--n-eval", type=int, default=2000, help="flow samples per evaluation (default 2000)")
    parser.add_argument("--reference-ns", type=float, default=None,
                        help="reference MD length in ns (default 5 vacuum, 2 implicit; 0.5 with --quick)")
    parser.add_argument("--work", default=None, help="work folder (default runs/fab_alanine_SOLVENT[_quick])")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results" / "fab_alanine"),
                        help="where the curve PNG and the JSON summary go")
    parser.add_argument("--quick", action="store_true", help="tiny run: 6 steps, batch 64, 500 samples")
    parser.add_argument("--ais-space", choices=("internal", "cartesian"), default="internal",
                        help="where FAB's HMC moves (option ais_space; default internal, the method's default "
                             "for this flow); results of cartesian runs get the suffix _cartesian")
    parser.add_argument("--option", nargs="+", default=[], metavar="KEY=VALUE",
                        help="FAB options on top of the bench's (YAML values), e.g. n_intermediate=8")
    parser.add_argument("--suffix", default="", help="appended to the result file names (e.g. _levels8)")
    args = parser.parse_args(argv)
    target = "alanine-dipeptide" + ("-implicit" if args.solvent == "implicit" else "")
    import yaml

    extra = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--option takes KEY=VALUE, got {item!r}")
        extra[key] = yaml.safe_load(value)
    options = {**(QUICK_OPTIONS if args.quick else FAB_OPTIONS), "ais_space": args.ais_space, **extra}
    steps, every, n_eval = (6, 3, 500) if args.quick else (args.steps, args.eval_every, args.n_eval)
    ns = args.reference_ns or (0.5 if args.quick else 5.0 if args.solvent == "vacuum" else 2.0)
    tag = (f"{args.solvent}{'_cartesian' if args.ais_space == 'cartesian' else ''}{args.suffix}"
           f"{'_quick' if args.quick else ''}")
    work = Path(args.work or ROOT / "runs" / f"fab_alanine_{tag}")
    work.mkdir(parents=True, exist_ok=True)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)

    ref_path = reference(work, args.solvent, ns)
    with np.load(ref_path, allow_pickle=False) as data:
        ref = np.asarray(data["positions"], dtype=np.float64)
    curve = train_and_evaluate(work, target, steps, every, n_eval, options, ref)
    from openmm_flowforce.samplers.common import load_sampler
    from openmm_flowforce.samplers.molecule_flow import save_boltzmann_generator

    loaded = load_sampler(work / "fab.ckpt")  # also as a Boltzmann-generator file: flowforce sample/export read it
    save_boltzmann_generator(loaded.model, work / "fab_bg.ckpt", loaded.target.temperature, loaded.target.system)
    plot_curve(curve, results / f"curve_{tag}.png", f"FAB, {target}")
    if (work / "last.png").exists():
        (results / f"last_{tag}.png").write_bytes((work / "last.png").read_bytes())
    summary = {"target": target, "options": options, "reference": {"ns": ns, "frames": len(ref)},
               "curve": curve, "python": sys.version.split()[0],
               "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    (results / f"fab_alanine_{tag}.json").write_text(json.dumps(summary, indent=1) + "\n")
    last = curve[-1]
    print(f"{target}: {last['steps']} steps, {last['energy_evaluations']:,} energy evaluations; JS raw "
          f"{last['raw']['js_phi_psi']:.3f}, reweighted {last['reweighted']['js_phi_psi']:.3f}, ESS {last['ess']:.4f}; "
          f"-> {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
