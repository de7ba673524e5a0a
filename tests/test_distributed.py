"""Data-parallel training on torch.distributed: two CPU processes (gloo) against one.

The worker script runs under ``torchrun --nproc-per-node 2``: each process takes its half of
every global batch through DistributedDataParallel. The gradient of one global batch and the
parameters after a few engine steps must equal those of one process on the same global
batches, up to floating-point reduction order (float64 here, so the tolerance is tight).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import toy_densities as toy
from openmm_flowforce.engine import data_parallel
from openmm_flowforce.flows import CouplingFlow
from openmm_flowforce.training import TrainConfig, Trainer
from openmm_flowforce.training.losses import nll_on_data

WORKER = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    sys.path.insert(0, {tests!r})
    import toy_densities as toy
    from openmm_flowforce.engine import data_parallel, init_distributed, shard, world
    from openmm_flowforce.flows import CouplingFlow
    from openmm_flowforce.training import TrainConfig, Trainer
    from openmm_flowforce.training.losses import nll_on_data

    torch.set_num_threads(1)
    init_distributed()
    assert world()[1] == 2 and dist.get_backend() == "gloo"
    torch.set_default_dtype(torch.float64)
    out = sys.argv[1]
    x = toy.sample(64, seed=1).double()
    torch.manual_seed(0)
    flow = CouplingFlow([True, False], n_layers=2, hidden=8, n_components=3).double()
    loss = data_parallel(flow, nll_on_data)
    loss(x[shard(torch.arange(64))]).backward()
    grads = [p.grad.clone() for p in flow.parameters()]

    torch.manual_seed(0)
    flow = CouplingFlow([True, False], n_layers=2, hidden=8, n_components=3).double()
    data = {{"x": toy.sample(500, seed=5).double(), "forces": toy.score(toy.sample(500, seed=5)).double()}}
    Trainer(flow, {{"nll": 1, "force": 0.1}}, data=data, checkpoint=out + "/ddp.ckpt",
            config=TrainConfig(steps=6, batch_size=32, lr=1e-2, validate_every=0, checkpoint_every=3)).run()
    if world()[0] == 0:
        torch.save({{"grads": grads, "params": flow.state_dict()}}, out + "/ddp.pt")
""")


def _single_process(tmp_path):
    torch.set_default_dtype(torch.float64)
    try:
        x = toy.sample(64, seed=1).double()
        torch.manual_seed(0)
        flow = CouplingFlow([True, False], n_layers=2, hidden=8, n_components=3).double()
        data_parallel(flow, nll_on_data)(x).backward()
        grads = [p.grad.clone() for p in flow.parameters()]
        torch.manual_seed(0)
        flow = CouplingFlow([True, False], n_layers=2, hidden=8, n_components=3).double()
        data = {"x": toy.sample(500, seed=5).double(), "forces": toy.score(toy.sample(500, seed=5)).double()}
        Trainer(flow, {"nll": 1, "force": 0.1}, data=data,
                config=TrainConfig(steps=6, batch_size=32, lr=1e-2, validate_every=0)).run()
    finally:
        torch.set_default_dtype(torch.float32)
    return grads, flow.state_dict()


@pytest.mark.slow  # ~40 s on two shared cores, nearly all of it starting two torch processes
def test_two_gloo_processes_match_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=os.path.dirname(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    grads, params = _single_process(tmp_path)
    for a, b in zip(grads, ddp["grads"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for key in params:
        torch.testing.assert_close(params[key], ddp["params"][key], rtol=1e-9, atol=1e-11)
    # The distributed run's checkpoint resumes in one process (and holds its engine state).
    assert torch.load(tmp_path / "ddp.ckpt", weights_only=True)["engine"]["step"] == 6


@pytest.mark.slow
def test_torchrun_flowforce_train_matches_one_process_and_resumes_with_another_count(tmp_path):
    from openmm_flowforce.cli.main import main

    data = tmp_path / "ala.npz"
    assert main(["md", "--time-ns", "0.02", "--save-every-ps", "0.2", "--equilibration-ps", "0.1", "--out", str(data),
                 "--no-progress"]) == 0
    (tmp_path / "flow.yaml").write_text("flow: {n_layers: 1, hidden: [8], n_components: 2}\n"
                                        "train: {validate_every: 5, checkpoint_every: 4}\n")
    args = ["train", str(data), "--steps", "8", "--batch-size", "16", "--config", str(tmp_path / "flow.yaml"),
            "--quiet"]
    assert main([*args, "--out", str(tmp_path / "one.ckpt")]) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                "openmm_flowforce.cli.main"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([*torchrun, *args, "--out", str(tmp_path / "two.ckpt")], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trained 8 steps") == 1, result.stdout  # two processes, only rank 0 reports
    one = torch.load(tmp_path / "one.ckpt", weights_only=True)["model"]
    two = torch.load(tmp_path / "two.ckpt", weights_only=True)["model"]
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5)
    # Resume the two-process run to more steps in one process.
    assert main([*args[:3], "12", *args[4:], "--out", str(tmp_path / "two.ckpt")]) == 0
    assert torch.load(tmp_path / "two.ckpt", weights_only=True)["engine"]["step"] == 12
