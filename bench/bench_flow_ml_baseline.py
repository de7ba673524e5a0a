"""How fast the energy-only samplers' flow learns a particle target when given its samples.

    python bench/bench_flow_ml_baseline.py [--target dw4] [--steps 600] [--lr 1e-3]

Builds the flow that ``flowforce sampler train --method fab|reverse-kl`` would build for
the target (same preset, same seed) and fits it by maximum likelihood to the reference
training split (``<shared data>/<target>/train.npy``, or ``val.npy`` where there is no
train split), printing the test-split NLL every 100 steps. This bounds what FAB or reverse
KL can reach in the same number of flow updates: they see worse samples than these.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

#: $FLOWFORCE_SHARED_DATA (as in the tests), else ../shared/data next to the repository.
DATA = Path(os.environ.get("FLOWFORCE_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="dw4", choices=["dw4", "lj13"])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--data", type=Path, default=DATA, help="folder with <target>/{train,val,test}.npy")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from openmm_flowforce.analysis.sampler_report import load_reference
    from openmm_flowforce.samplers import get_method
    from openmm_flowforce.targets import get_target

    target = get_target(args.target)
    method = get_method("fab")  # FAB and reverse KL build the same flow
    torch.manual_seed(0)
    model = method.build(target, {})
    folder = args.data / args.target
    train_file = folder / "train.npy" if (folder / "train.npy").exists() else folder / "val.npy"
    train = torch.as_tensor(load_reference(str(train_file), target, 20000), dtype=torch.float64)
    test = torch.as_tensor(load_reference(str(folder / "test.npy"), target, 1000), dtype=torch.float64)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(args.steps + 1):
        if step % 100 == 0 or step == args.steps:
            with torch.no_grad():
                nll = -float(model.log_prob(test).mean())
            print(f"step {step:>5}  test NLL {nll:8.3f}  {time.perf_counter() - start:6.0f} s", flush=True)
        if step == args.steps:
            break
        batch = train[torch.randint(0, len(train), (args.batch_size,), generator=generator)]
        loss = -model.log_prob(batch).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


if __name__ == "__main__":
    main()
