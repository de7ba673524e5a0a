"""The shared interrupt-and-resume test every training method runs, and the refusal of stale state.

Every method trains on the one engine (:mod:`openmm_flowforce.engine`). Each case runs the
``flowforce`` command once uninterrupted and once interrupted by a real SIGINT at a random
step (drawn from a seeded RNG, so a failure reproduces), then reruns the same command, and
compares the model files: the parameters must be bit-identical on CPU.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from openmm_flowforce.cli.main import main
from openmm_flowforce.engine import Engine


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    for name, seed in (("ala.npz", 0), ("other.npz", 1)):
        assert main(["md", "--time-ns", "0.02", "--save-every-ps", "0.2", "--equilibration-ps", "0.1",
                     "--seed", str(seed), "--out", str(d / name), "--no-progress"]) == 0
    (d / "flow.yaml").write_text("flow: {n_layers: 1, hidden: [8], n_components: 2}\n"
                                 "train: {validate_every: 5, checkpoint_every: 1000}\n")
    (d / "cg.yaml").write_text(
        "flow: {n_layers: 1, hidden: [8], n_components: 2}\n"
        "flow_train: {steps: 12, batch_size: 16, validate_every: 4, checkpoint_every: 1000}\n"
        "flow_samples: 64\nnet: {hidden: [8]}\n"
        "cg_train: {steps: 12, batch_size: 16, validate_every: 4, checkpoint_every: 1000}\n")
    (d / "idem.yaml").write_text("options: {n_mc: 20, batch: 16, n_generate: 32, integration_steps: 10, "
                                 "steps_per_outer: 2, hidden: 8, n_layers: 2, n_init: 64, checkpoint_every: 1000}\n")
    (d / "fab.yaml").write_text("options: {n_layers: 2, hidden: 8, n_components: 3, batch_size: 16, n_intermediate: 1, "
                                "min_buffer: 32, buffer_size: 64, n_updates: 2, checkpoint_every: 1000}\n")
    (d / "reverse-kl.yaml").write_text("options: {n_layers: 2, hidden: 8, n_components: 3, batch_size: 16, "
                                       "checkpoint_every: 1000}\n")
    return d


def _command(case: str, d, out) -> tuple[list[str], int]:
    """The command of a case and the number of engine steps it runs in all."""
    if case == "train":
        return ["train", str(d / "ala.npz"), "--out", str(out), "--steps", "15", "--batch-size", "16",
                "--config", str(d / "flow.yaml"), "--quiet"], 15
    if case.startswith("cg-"):
        return ["cg", str(d / "ala.npz"), "--out", str(out), "--method", case[3:], "--config", str(d / "cg.yaml"),
                "--quiet"], 24 if case == "cg-flow-matching" else 12
    method = case.split("-", 1)[1]
    return ["sampler", "train", "--target", "dw4", "--method", method, "--out", str(out), "--steps", "8",
            "--config", str(d / f"{method}.yaml"), "--quiet"], 8


CASES = ["train", "cg-flow-matching", "cg-force-matching", "sampler-idem", "sampler-fab", "sampler-reverse-kl"]


@pytest.mark.parametrize("case", CASES)
def test_sigint_at_a_random_step_then_rerun_equals_an_uninterrupted_run(case, data, tmp_path, monkeypatch, capsys):
    straight = tmp_path / "straight.ckpt"
    command, total = _command(case, data, straight)
    assert main(command) == 0

    stop_at = random.Random(case).randint(1, total - 1)  # engine steps of the whole command
    done = [0]

    def after_step(engine: Engine) -> None:
        done[0] += 1
        if done[0] == stop_at:
            os.kill(os.getpid(), signal.SIGINT)  # the real signal, through the engine's handler

    interrupted = tmp_path / "interrupted.ckpt"
    command, _ = _command(case, data, interrupted)
    with monkeypatch.context() as patch:
        patch.setattr(Engine, "after_step", after_step)
        capsys.readouterr()
        assert main(command) == 130, f"interrupt at step {stop_at} of {total}"
        err = capsys.readouterr().err
    assert "interrupted" in err and "continue" in err, err
    assert main(command) == 0

    a = torch.load(straight, weights_only=True)
    b = torch.load(interrupted, weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), (key, stop_at)
    if case.startswith("sampler-"):
        assert a["summary"]["energy_evaluations"] == b["summary"]["energy_evaluations"]
        assert a["summary"]["steps"] == b["summary"]["steps"] == total


@pytest.mark.slow
def test_sigint_to_a_real_flowforce_train_process_resumes_exactly(data, tmp_path):
    steps = ["--steps", "400", "--batch-size", "8", "--config", str(data / "flow.yaml"), "--quiet"]
    assert main(["train", str(data / "ala.npz"), "--out", str(tmp_path / "a.ckpt"), *steps]) == 0
    out, log = tmp_path / "b.ckpt", tmp_path / "b.jsonl"
    command = [sys.executable, "-m", "openmm_flowforce.cli.main", "train", str(data / "ala.npz"), "--out", str(out),
               *steps]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (log.exists() and log.stat().st_size > 0) and time.time() < deadline and process.poll() is None:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    stopped = torch.load(out, weights_only=True)["step"]
    assert 10 <= stopped < 400, stopped
    assert subprocess.run(command, capture_output=True, timeout=300).returncode == 0
    a, b = torch.load(tmp_path / "a.ckpt", weights_only=True), torch.load(out, weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_other_data_or_options_are_refused_and_restart_keeps_the_old_file(data, tmp_path, capsys):
    out = tmp_path / "m.ckpt"
    base = ["--out", str(out), "--steps", "3", "--batch-size", "8", "--config", str(data / "flow.yaml"), "--quiet"]
    assert main(["train", str(data / "ala.npz"), *base]) == 0
    capsys.readouterr()
    assert main(["train", str(data / "other.npz"), *base]) == 2
    err = capsys.readouterr().err
    assert "training data" in err and "--restart" in err and str(out) in err, err
    assert main(["train", str(data / "ala.npz"), *base, "--transform", "spline"]) == 2
    err = capsys.readouterr().err
    assert "flow.transform ('smooth' → 'spline')" in err, err
    before = torch.load(out, weights_only=True)["model"]
    assert main(["train", str(data / "other.npz"), *base, "--restart"]) == 0
    prev = torch.load(tmp_path / "m.ckpt.prev", weights_only=True)["model"]
    assert all(torch.equal(before[k], prev[k]) for k in before)

    cg = tmp_path / "cg.ckpt"
    cg_args = ["--out", str(cg), "--config", str(data / "cg.yaml"), "--quiet"]
    assert main(["cg", str(data / "ala.npz"), *cg_args]) == 0
    capsys.readouterr()
    assert main(["cg", str(data / "other.npz"), *cg_args]) == 2  # the flow was fitted to ala.npz
    err = capsys.readouterr().err
    assert "cg.flow.ckpt" in err and "training data" in err, err
    assert main(["cg", str(data / "other.npz"), *cg_args, "--restart"]) == 0
    assert (tmp_path / "cg.flow.ckpt.prev").exists() and (tmp_path / "cg.state.ckpt.prev").exists()

    s = tmp_path / "s.ckpt"
    sampler = ["sampler", "train", "--target", "dw4", "--method", "reverse-kl", "--out", str(s), "--steps", "2",
               "--config", str(data / "reverse-kl.yaml"), "--quiet"]
    assert main(sampler) == 0
    capsys.readouterr()
    assert main([*sampler, "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "seed (0 → 3)" in err and "--restart" in err, err


def test_training_leaves_the_callers_random_streams_alone(data, tmp_path):
    import numpy as np

    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    expected = torch.rand(3), np.random.rand(3), random.random()
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    assert main(["train", str(data / "ala.npz"), "--out", str(tmp_path / "m.ckpt"), "--steps", "3", "--batch-size",
                 "8", "--config", str(data / "flow.yaml"), "--quiet"]) == 0
    assert main(["sampler", "train", "--target", "dw4", "--method", "reverse-kl", "--out", str(tmp_path / "s.ckpt"),
                 "--steps", "2", "--config", str(data / "reverse-kl.yaml"), "--quiet"]) == 0
    got = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_sigterm_saves_at_a_step_boundary_and_says_so(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "m.ckpt"
    command = ["train", str(data / "ala.npz"), "--out", str(out), "--steps", "6", "--batch-size", "8", "--config",
               str(data / "flow.yaml"), "--quiet"]

    def after_step(engine: Engine) -> None:
        if engine.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as patch:
        patch.setattr(Engine, "after_step", after_step)
        assert main(command) == 130
    err = capsys.readouterr().err
    assert "interrupted (SIGTERM)" in err and str(out) in err, err
    assert torch.load(out, weights_only=True)["step"] == 3
    assert main(command) == 0 and torch.load(out, weights_only=True)["step"] == 6
