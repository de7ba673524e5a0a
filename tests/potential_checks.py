"""Shared checks for learned potentials: float64 eager references and one closeness rule.

Tolerances, and why:
* float64 graphs and packages reproduce the float64 eager model to rounding: relative 1e-9
  of the largest |U| or |F| (sums are reassociated by fusion and constant folding).
* float32 packages compute the geometry in float64 and the networks in float32
  (:mod:`openmm_flowforce.export.models`); against float64 eager they agree to 1e-4
  relative to the largest force and to 1e-5 of |U| + 1 kJ/mol in energy.
"""
from __future__ import annotations

import numpy as np
import torch

FLOAT32_FORCE_RTOL = 1e-4
FLOAT64_RTOL = 1e-9


class default_dtype:
    """``with default_dtype(torch.float64):`` builds models in that dtype, then restores."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.old)


def eager_flow(model, positions, temperature=300.0):
    """(U kJ/mol, F (N, 3) kJ/mol/nm) of a Boltzmann generator at positions (N, 3) nm, float64 autograd."""
    x = torch.as_tensor(positions, dtype=torch.float64)[None].requires_grad_(True)
    energy = model.energy(x, temperature)
    (grad,) = torch.autograd.grad(energy.sum(), x)
    return float(energy.detach()), -grad[0].numpy()


def eager_cg(net, beads):
    """(E kJ/mol, F (n, 3) kJ/mol/nm) of a CG net at bead positions (n, 3) nm."""
    energy, forces = net.energy_and_forces(torch.as_tensor(beads, dtype=torch.float64)[None])
    return float(energy.detach()), forces[0].detach().numpy()


def assert_close(energy, forces, want_energy, want_forces, rtol):
    """|ΔU| ≤ rtol·(|U| + 1) and max |ΔF| ≤ rtol·(max |F| + 1)."""
    energy, forces = float(energy), np.asarray(forces, dtype=np.float64)
    assert abs(energy - want_energy) <= rtol * (abs(want_energy) + 1.0), (energy, want_energy)
    scale = float(np.abs(want_forces).max()) + 1.0
    assert np.abs(forces - want_forces).max() <= rtol * scale, np.abs(forces - want_forces).max() / scale


def require_native_plugin() -> None:
    """Skip where the native plugin was not built (no compiler); fail where it was built but does not load."""
    import pytest

    from openmm_flowforce.export.native import native_build_info, native_unavailable

    reason = native_unavailable()
    if reason is None:
        return
    if native_build_info().get("status") == "built":
        pytest.fail(f"the native plugin was built but does not load: {reason}")
    pytest.skip(f"native plugin not built here: {reason}")
