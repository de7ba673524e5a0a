"""Every example runs (in a reduced form) and does what it says."""
from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_toy_torus_flow_example(tmp_path):
    result = _load("toy_torus_flow").main(["--steps", "150", "--out", str(tmp_path / "toy.ckpt")])
    assert result["val_nll_after"] < result["val_nll_before"] - 0.3
    assert result["round_trip_error"] < 1e-4  # float32 root finding
    assert (tmp_path / "toy.ckpt").is_file()
