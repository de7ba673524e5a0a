"""The MALA kernel of bench/make_lj55_reference.py leaves the LJ-13 reference ensemble in
place, and the script runs end to end (a tiny run; --quick itself takes ~20 s)."""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from openmm_flowforce.targets import get_target

ROOT = Path(__file__).resolve().parent.parent
#: The iDEM authors' reference sets: $FLOWFORCE_SHARED_DATA, else ../shared/data next to the repository.
SHARED_DATA = Path(os.environ.get("FLOWFORCE_SHARED_DATA") or ROOT.parent / "shared" / "data")


def _load_script():
    spec = importlib.util.spec_from_file_location("make_lj55_reference", ROOT / "bench" / "make_lj55_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mala_keeps_the_lj13_reference_distribution():
    path = SHARED_DATA / "lj13" / "test.npy"
    if not path.is_file():
        pytest.skip(f"shared reference data not found at {path}")
    script = _load_script()
    target = get_target("lj13")
    x0 = torch.from_numpy(np.load(path)[:256]).double()
    reference = target.energy(torch.from_numpy(np.load(path)).double())
    result = script.run_mala(target, x0, n_burn_in=100, n_steps=400, thin=20,
                             generator=torch.Generator().manual_seed(0), progress=False)
    assert 0.4 < result["acceptance"] < 0.75
    samples = result["samples"]
    assert samples.shape == (256, 20, 39)
    assert samples.reshape(-1, 13, 3).mean(1).abs().max() < 1e-10  # stays mean-free
    energies = target.energy(samples.reshape(-1, 39))
    torch.testing.assert_close(energies, result["energies"].reshape(-1))
    # Mean energy stays put: within 3% (≈ 4 standard errors of the chain means).
    assert float(energies.mean()) == pytest.approx(float(reference.mean()), rel=0.03)
    assert float(energies.std()) == pytest.approx(float(reference.std()), rel=0.1)
    check = script.equipartition(target, samples)
    assert check["expected"] == 18.0
    assert abs(check["mean"] - 18.0) < 4 * check["standard_error"]


def test_mala_step_samples_a_gaussian():
    """Exactness on a target with known moments: u = ½|x|² (no projection)."""
    script = _load_script()

    class Gaussian:
        def energy(self, x):
            return 0.5 * x.pow(2).sum(-1)

    g = torch.Generator().manual_seed(1)
    x = torch.zeros(2000, 3, dtype=torch.float64)
    u, grad = script.energy_and_grad(Gaussian(), x)
    step = torch.full((2000,), 0.8, dtype=torch.float64)  # large step: the MH correction matters
    for _ in range(200):
        x, u, grad, _ = script.mala_step(Gaussian(), x, u, grad, step, g)
    assert x.mean().abs() < 0.05
    assert float(x.var()) == pytest.approx(1.0, abs=0.06)


def test_script_runs_and_writes_samples(tmp_path, capsys):
    script = _load_script()
    out = tmp_path / "lj55.npy"
    summary = script.main(["--chains", "4", "--burn-in", "20", "--steps", "20", "--thin", "10", "--out", str(out),
                           "--no-progress"])
    samples = np.load(out)
    assert samples.shape == (8, 165) and samples.dtype == np.float32
    assert summary["half_virial_expected"] == 81.0
    assert math.isfinite(summary["energy_mean"])
    assert "equipartition" in capsys.readouterr().out
