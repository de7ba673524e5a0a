"""Longer energy-only sampler runs on a GPU, each capped in wall time (issue 13 §2).

Rows: FAB with the SE(3)-equivariant augmented flow on DW-4 and LJ-13, and iDEM on LJ-55
with the paper's LJ-55 settings (``idem.PAPER_SETTINGS``). Each run trains on the device
until its budget is spent (then a SIGTERM, sent once the engine listens for it: the engine
finishes the step in flight, writes the checkpoint and stops), then the checkpoint is reloaded on the CPU and compared
with the shared reference sets by :func:`~openmm_flowforce.analysis.sampler_report.evaluate_sampler`
(W2, energy W2, TV, NLL, ESS). LJ-55 has no shared reference: without
``--lj55-reference`` (a ``.npy`` from ``bench/make_lj55_reference.py``) its row reports the
energies of 1000 samples only.

    python bench/gpu_samplers.py --out gpu_samplers.json [--device cuda] [--scale 1.0]

``--scale`` multiplies every budget (0.05 for a smoke test on a CPU). The samplers have no
device option: training, sampling and the model's log q run inside ``with
torch.device(device)``, so every tensor the model, target and sampler create lands on the
device; the metrics then run on the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

DATA = Path(os.environ.get("FLOWFORCE_SHARED_DATA", "/work/shared/data"))


def _jobs() -> list[dict]:
    from openmm_flowforce.samplers.idem import PAPER_SETTINGS

    fab = dict(flow="equivariant", batch_size=256, min_buffer=1024, buffer_size=8192, n_updates=4,
               checkpoint_every=50, log_every=10, steps=100000)
    idem_lj55 = {k: v for k, v in PAPER_SETTINGS["lj55"].items()}
    idem_lj55.update(steps=200000, checkpoint_every=100, log_every=10)
    return [
        dict(name="dw4_fab_equivariant", target="dw4", method="fab", options=fab, budget_s=140,
             reference=DATA / "dw4" / "test.npy", align=True),
        dict(name="lj13_fab_equivariant", target="lj13", method="fab", options=fab, budget_s=180,
             reference=DATA / "lj13" / "test.npy", align=False),
        dict(name="lj55_idem", target="lj55", method="idem", options=idem_lj55, budget_s=120, reference=None,
             align=False),
    ]


def _engine_is_listening() -> bool:
    """Whether the training engine's SIGINT/SIGTERM handler is installed (it is only while
    :meth:`Engine.run` loops; before that a SIGTERM would kill the process, checkpointless)."""
    handler = signal.getsignal(signal.SIGTERM)
    return type(getattr(handler, "__self__", None)).__name__ == "_StopOnSignal"


def _train_for(method, model, target, options, checkpoint: Path, budget_s: float) -> None:
    """Train until ``budget_s`` seconds have passed, then SIGTERM once the engine listens:
    it finishes the step in flight, writes the checkpoint and stops."""
    done = threading.Event()

    def stop_later() -> None:
        if done.wait(budget_s):
            return
        while not done.is_set():
            if _engine_is_listening():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            done.wait(0.2)

    timer = threading.Thread(target=stop_later, daemon=True)
    timer.start()
    try:
        method.train(model, target, options, checkpoint, progress=False, log_path=checkpoint.with_suffix(".jsonl"))
    except KeyboardInterrupt:
        pass
    finally:
        done.set()
        timer.join()


class _OnDevice:
    """A sampler method whose ``sample`` / ``log_prob`` run the trained model on the device and
    hand back CPU tensors, so :func:`evaluate_sampler` (numpy, POT) runs on the CPU while the
    network work (SDE integration, importance sampling) stays on the GPU."""

    def __init__(self, method, model, device: str):
        self.method, self.model, self.device = method, model, device

    def sample(self, model, n: int) -> torch.Tensor:
        with torch.device(self.device):
            return self.method.sample(self.model, n).detach().cpu()

    def log_prob(self, model, x: torch.Tensor):
        with torch.device(self.device):
            log_q = self.method.log_prob(self.model, x.to(self.device))
        return None if log_q is None else log_q.detach().cpu()


def run_job(job: dict, device: str, scale: float, workdir: Path, lj55_reference: str | None) -> dict:
    from openmm_flowforce.analysis.sampler_report import evaluate_sampler, load_reference
    from openmm_flowforce.samplers import get_method
    from openmm_flowforce.samplers.common import load_sampler, make_target

    checkpoint = workdir / f"{job['name']}.ckpt"
    method = get_method(job["method"])
    start = time.perf_counter()
    with torch.device(device):
        target = make_target(job["target"])
        options = method.options(job["options"])
        model = method.build(target, options)
        _train_for(method, model, target, options, checkpoint, job["budget_s"] * scale)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    train_s = time.perf_counter() - start
    model.eval()
    loaded = load_sampler(checkpoint)  # CPU copy: the target and the dtype the metrics use
    summary = loaded.checkpoint.get("summary", {})
    on_device = _OnDevice(method, model, device)
    row = {"name": job["name"], "target": job["target"], "method": job["method"], "options": job["options"],
           "device": device, "budget_s": job["budget_s"] * scale, "train_wall_s": train_s,
           "training_steps": summary.get("steps"), "energy_evaluations": summary.get("energy_evaluations")}
    reference_path = job["reference"] or lj55_reference
    if reference_path is not None:
        reference = load_reference(str(reference_path), loaded.target, 1000, seed=0)
        row.update(evaluate_sampler(on_device, loaded.model, loaded.target, reference, align=job["align"]))
    else:
        with torch.no_grad():
            x = on_device.sample(None, 1000).to(torch.float64)
            u = loaded.target.energy(x)
        finite = u[torch.isfinite(u)]
        row.update(n=1000, n_nonfinite_energy=int((~torch.isfinite(u)).sum()),
                   energy_mean_generated=float(finite.mean()) if len(finite) else None,
                   energy_median_generated=float(finite.median()) if len(finite) else None)
    row["total_wall_s"] = time.perf_counter() - start
    return row


def main(argv: list[str] | None = None) -> int:
    from openmm_flowforce.samplers.common import import_methods

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_samplers.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every time budget")
    parser.add_argument("--only", nargs="*", help="run only these job names")
    parser.add_argument("--lj55-reference", help="LJ-55 reference .npy (bench/make_lj55_reference.py)")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    import_methods()
    workdir = Path(args.workdir or Path(args.out).with_suffix("").as_posix() + "_ckpt")
    workdir.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "torch": torch.__version__, "device": args.device,
               "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None}
    rows = []
    for job in _jobs():
        if args.only and job["name"] not in args.only:
            continue
        print(f"== {job['name']} ({job['budget_s'] * args.scale:.0f} s)", file=sys.stderr, flush=True)
        try:
            rows.append(run_job(job, args.device, args.scale, workdir, args.lj55_reference))
        except Exception as error:  # one failed row must not lose the others
            rows.append({"name": job["name"], "error": f"{type(error).__name__}: {error}"})
        print(json.dumps(rows[-1], default=str), file=sys.stderr, flush=True)
        # written after every row, so a run cut short still leaves what it measured
        Path(args.out).write_text(json.dumps({"machine": machine, "command": " ".join(sys.argv), "rows": rows},
                                             indent=2, default=str) + "\n")
    print(f"-> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
