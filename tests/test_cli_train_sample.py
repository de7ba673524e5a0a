"""`flowforce md → train → sample` from the command line, on the built-in alanine dipeptide."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from openmm_flowforce.cli.main import main
from openmm_flowforce.potentials import load_boltzmann_generator


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "ala.npz"
    assert main(["md", "--time-ns", "0.1", "--save-every-ps", "0.2", "--equilibration-ps", "1",
                 "--out", str(path), "--no-progress"]) == 0
    return path


@pytest.fixture(scope="module")
def model_file(data_file):
    out = data_file.parent / "ala.ckpt"
    assert main(["train", str(data_file), "--out", str(out), "--steps", "20", "--batch-size", "64",
                 "--loss", "nll=1,force=0.01", "--quiet"]) == 0
    return out


def test_train_writes_a_model_and_a_metrics_log(model_file):
    model = load_boltzmann_generator(model_file)
    assert model.n_atoms == 22
    rows = [json.loads(line) for line in model_file.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20]
    assert {"loss_nll", "loss_force"} <= set(rows[-1])
    meta = torch.load(model_file, weights_only=True)["metadata"]
    assert meta["temperature"] == 300.0 and "<System" in meta["system_xml"]


def test_rerunning_train_resumes_from_the_model_file(model_file, data_file, capsys):
    assert main(["train", str(data_file), "--out", str(model_file), "--steps", "30", "--batch-size", "64",
                 "--loss", "nll=1,force=0.01", "--quiet"]) == 0
    assert "trained 30 steps" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in model_file.with_suffix(".jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30]


def test_sample_with_reweighting(model_file, tmp_path, capsys):
    out = tmp_path / "samples.npz"
    assert main(["sample", str(model_file), "-n", "64", "--out", str(out), "--reweight"]) == 0
    assert "effective sample size" in capsys.readouterr().out
    with np.load(out, allow_pickle=False) as f:
        assert f["positions"].shape == (64, 22, 3) and f["log_q"].shape == (64,)
        assert np.isfinite(f["reduced_energies"]).all()
        assert 0 < float(f["ess"]) <= 1 and f["log_weights"].max() == 0.0


@pytest.mark.parametrize("args, message", [
    (["--loss", "nll=1,forces=2"], "valid names: nll, force, reverse_kl"),
    (["--steps", "0"], "argument --steps: must be an integer ≥ 1, got '0'"),
])
def test_train_rejects_bad_options(data_file, tmp_path, capsys, args, message):
    assert main(["train", str(data_file), "--out", str(tmp_path / "m.ckpt"), "--quiet", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.ckpt").exists()


def test_train_rejects_unknown_config_keys_and_angstrom_data(data_file, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("flow: {n_layer: 3}\n")
    assert main(["train", str(data_file), "--out", str(tmp_path / "m.ckpt"), "--config", str(config)]) == 2
    assert "unknown option flow.n_layer; valid: transform, n_layers" in capsys.readouterr().err
    config.write_text("epoch: 3\n")
    assert main(["train", str(data_file), "--out", str(tmp_path / "m.ckpt"), "--config", str(config)]) == 2
    assert "unknown option epoch; valid: flow, train, loss, epochs" in capsys.readouterr().err
    with np.load(data_file, allow_pickle=False) as f:
        arrays = dict(f)
    arrays["positions"] = arrays["positions"] * 10
    bad = tmp_path / "angstrom.npz"
    np.savez(bad, **arrays)
    assert main(["train", str(bad), "--out", str(tmp_path / "m.ckpt")]) == 2
    assert "divide them by 10" in capsys.readouterr().err


def test_sample_rejects_a_corrupt_model_file(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00garbage")
    assert main(["sample", str(bad), "-n", "5", "--out", str(tmp_path / "s.npz")]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert not (tmp_path / "s.npz").exists()


def test_md_train_export_simulate_end_to_end(model_file, tmp_path):
    """The README's path: the trained model, exported, runs in OpenMM and writes a DCD that
    mdtraj reads with the right atom count; the energy log is finite."""
    import mdtraj

    from openmm_flowforce.data import alanine_dipeptide_pdb

    pt, dcd, log = tmp_path / "ala.pt", tmp_path / "traj.dcd", tmp_path / "log.csv"
    assert main(["export", str(model_file), "--out", str(pt)]) == 0
    assert main(["simulate", str(pt), "--topology", alanine_dipeptide_pdb(), "--steps", "400",
                 "--timestep-fs", "0.5", "--report-interval", "50", "--platform", "Reference",
                 "--out", str(dcd), "--report", str(log)]) == 0
    traj = mdtraj.load(str(dcd), top=alanine_dipeptide_pdb())
    assert traj.n_frames == 8 and traj.n_atoms == 22
    energies = np.genfromtxt(log, delimiter=",", names=True)
    assert np.isfinite(energies[energies.dtype.names[1]]).all()
