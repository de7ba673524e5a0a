"""Cost and sanity of `flowforce evaluate --protein` at realistic sizes, on chignolin frames
with a known folded fraction.

    python bench/bench_protein_eval.py [--frames 100000] [--seed 0]

Frames: the all-atom CLN025 hairpin (tests/data/cln025_hairpin.pdb, the "folded" structure)
and the extended frame of the shared cln025.pdb, superposed; each frame interpolates between
them with a parameter that follows a two-state Markov jump process (per-frame switching
probabilities 0.001 to fold and 0.002 to unfold: folded population 1/3, ~67 folding events
per 100 000 frames, relaxation time −1/log(1 − 0.003) = 333 frames), plus 0.01 nm Gaussian
noise per atom. The reference is all-atom (mapped to
Cα and heavy-atom Q computed), the model the Cα beads of an independent run of the same
process, so the answer is known: both folded fractions should cover 1/3 within their errors and
the JS divergences should be small (same distribution, finite samples). Prints the timings
of each stage (no plotting of the time series beyond the 3 PNGs) and writes DIR/report.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
HAIRPIN = ROOT / "tests" / "data" / "cln025_hairpin.pdb"
EXTENDED = ROOT.parent / "shared" / "data" / "cln025" / "cln025.pdb"


def _states(n: int, p_fold: float, p_unfold: float, rng: np.random.Generator) -> np.ndarray:
    u = rng.random(n)
    s = np.empty(n, dtype=np.int64)
    s[0] = 1
    for t in range(1, n):
        s[t] = (1 - s[t - 1]) if u[t] < (p_unfold if s[t - 1] == 0 else p_fold) else s[t - 1]
    return s  # 1 unfolded, 0 folded (the interpolation parameter)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extended", default=str(EXTENDED))
    parser.add_argument("--workdir", default="protein_eval_bench")
    args = parser.parse_args()
    from openmm import app

    from openmm_flowforce.analysis.protein_frames import ProteinFrames, load_folded_structure
    from openmm_flowforce.analysis.protein_report import ProteinOptions, evaluate_protein, plot_protein

    out = Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    hairpin = app.PDBFile(str(HAIRPIN))
    folded_xyz = np.asarray(hairpin.getPositions(asNumpy=True)._value)
    ext = np.asarray(app.PDBFile(args.extended).getPositions(asNumpy=True)._value)
    a, b = ext - ext.mean(0), folded_xyz - folded_xyz.mean(0)
    u, _, vt = np.linalg.svd(a.T @ b)
    ext = a @ (u @ np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))]) @ vt) + folded_xyz.mean(0)
    folded = load_folded_structure(HAIRPIN)
    ca = [a.index for a in hairpin.topology.atoms() if a.name == "CA"]

    timings: dict[str, float] = {}
    start = time.perf_counter()
    ensembles = []
    for which in ("reference", "model"):
        s = _states(args.frames, 0.001, 0.002, rng).astype(np.float32)
        s = np.clip(s + rng.normal(scale=0.05, size=len(s)).astype(np.float32), 0, 1)
        x = ((1 - s)[:, None, None] * folded_xyz[None] + s[:, None, None] * ext[None]).astype(np.float32)
        x += rng.normal(scale=0.01, size=x.shape).astype(np.float32)
        residues = folded.residues
        if which == "reference":
            ensembles.append(ProteinFrames(ca=x[:, ca].astype(np.float64), residues=residues, sequence=folded.sequence, replica=None,
                                           frame_ps=10.0, source="bench reference (all-atom)",
                                           all_atom=x, topology=hairpin.topology))
        else:
            ensembles.append(ProteinFrames(ca=x[:, ca].astype(np.float64), residues=residues, sequence=folded.sequence, replica=None,
                                           frame_ps=10.0, source="bench model (Ca)"))
    timings["make frames"] = time.perf_counter() - start
    start = time.perf_counter()
    evaluation = evaluate_protein(ensembles[0], ensembles[1], folded, ProteinOptions(tica_lag=10, bins=30))
    timings["evaluate (Q, RMSD, states, TICA, FES)"] = time.perf_counter() - start
    start = time.perf_counter()
    plot_protein(evaluation, out)
    timings["3 PNGs"] = time.perf_counter() - start
    report = evaluation.report()
    report["timings_s"] = timings
    (out / "report.json").write_text(json.dumps(report, indent=1))
    for name in ("reference", "model"):
        e = report["ensembles"][name]
        f = e["folded_fraction"]
        print(f"{name}: folded {f['value']:.4f} +- {f['stderr']:.4f} (true 1/3), events {e['events']}")
    for name, surface in report["surfaces"].items():
        print(f"JS {name}: {surface['divergences_nats']['js']:.4f} nats")
    print(f"TICA timescales (frames): {report['tica']['timescales_frames']}")
    for stage, seconds in timings.items():
        print(f"{stage}: {seconds:.1f} s")


if __name__ == "__main__":
    main()
