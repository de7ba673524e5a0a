"""TorchScript export of the flow potential U = −kT·log q: equality with the eager model,
dtypes, invariances, finiteness far from the data, metadata, atomic writing, ``flowforce export``."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from openmm_flowforce.conventions import kT
from openmm_flowforce.export.torchscript import (EXPORT_FORMAT, export_potential, is_exported_file, load_exported,
                                                 read_export_metadata)
from openmm_flowforce.io import CHECKPOINT_FORMAT, save_checkpoint
from openmm_flowforce.potentials import BoltzmannGenerator
from potential_checks import default_dtype


@pytest.fixture(scope="module")
def model(alanine_md):
    """Untrained, but not the identity (identity_init=False): a non-trivial density, float64."""
    torch.manual_seed(0)
    with default_dtype(torch.float64):
        return BoltzmannGenerator.from_topology(alanine_md["topology"], alanine_md["positions"][:1200], n_layers=2,
                                                hidden=16, n_components=4, identity_init=False)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "model.pt"
    return export_potential(model, path, temperature=300.0)


def _eager(model, positions: np.ndarray, temperature: float = 300.0) -> tuple[float, np.ndarray]:
    x = torch.as_tensor(positions, dtype=torch.float64)[None].requires_grad_(True)
    energy = model.energy(x, temperature)
    (grad,) = torch.autograd.grad(energy.sum(), x)
    return float(energy.detach()), grad[0].numpy()


def _exported(module, positions, dtype=torch.float64) -> tuple[torch.Tensor, np.ndarray]:
    """Energy and gradient (−forces) from the module, which returns (energy, forces)."""
    energy, forces = module(torch.as_tensor(positions).to(dtype).requires_grad_(True))
    assert energy.dtype == forces.dtype == dtype and forces.shape == (len(positions), 3)
    assert not energy.requires_grad and not forces.requires_grad  # no graph handed back to OpenMM
    return energy, -forces.numpy()


def _random_rotation(seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


def test_exported_energy_and_gradient_equal_eager_float64(model, exported, alanine_md):
    module = load_exported(exported).module
    for frame in (0, 700, 1499):  # 1499: outside the frames the coordinates were fitted to
        positions = alanine_md["positions"][frame]
        want_energy, want_grad = _eager(model, positions)
        energy, grad = _exported(module, positions)
        assert energy.dtype == torch.float64 and energy.shape == ()
        assert float(energy) == pytest.approx(want_energy, rel=1e-12, abs=1e-9)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-8)


def test_exported_module_takes_float32_and_returns_float32(model, exported, alanine_md):
    module = load_exported(exported).module
    positions32 = alanine_md["positions"][3].astype(np.float32)
    energy, grad = _exported(module, positions32, torch.float32)
    assert energy.dtype == torch.float32 and grad.dtype == np.float32
    # Computed in float64 from the float32 positions; only the final cast rounds.
    want_energy, want_grad = _eager(model, positions32.astype(np.float64))
    assert float(energy) == pytest.approx(want_energy, rel=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-3 * np.abs(want_grad).max())


def test_exported_energy_is_invariant_to_rotation_and_translation(exported, alanine_md):
    module = load_exported(exported).module
    positions = alanine_md["positions"][11]
    energy, grad = _exported(module, positions)
    rotation = _random_rotation(3)
    moved = positions @ rotation.T + np.array([1.7, -0.4, 3.1])
    moved_energy, moved_grad = _exported(module, moved)
    assert float(moved_energy) == pytest.approx(float(energy), rel=1e-10, abs=1e-8)
    # Forces rotate with the molecule.
    np.testing.assert_allclose(moved_grad, grad @ rotation.T, rtol=1e-7, atol=1e-6 * np.abs(grad).max())


def test_temperature_scales_the_energy(model, tmp_path, alanine_md):
    hot = load_exported(export_potential(model, tmp_path / "hot.pt", temperature=600.0))
    cold = load_exported(export_potential(model, tmp_path / "cold.pt", temperature=300.0))
    positions = alanine_md["positions"][5]
    assert hot.energy(positions) == pytest.approx(2.0 * cold.energy(positions), rel=1e-12)
    with torch.no_grad():
        log_q = float(model.log_prob(torch.as_tensor(positions)[None]))
    assert cold.energy(positions) == pytest.approx(-kT(300.0) * log_q, rel=1e-12)


def test_energy_and_forces_are_finite_far_from_the_data(exported, alanine_md):
    module = load_exported(exported).module
    rng = np.random.default_rng(0)
    base = alanine_md["positions"][0]
    cases = [base + rng.normal(scale=0.05, size=base.shape),       # displaced
             base + rng.normal(scale=0.5, size=base.shape),        # badly displaced
             base * 10.0, base * 1000.0,                            # stretched
             rng.uniform(-50.0, 50.0, size=base.shape),             # random far out
             rng.normal(scale=1e-3, size=base.shape)]               # collapsed, atoms not coinciding
    for i, positions in enumerate(cases):
        for dtype in (torch.float64, torch.float32):
            energy, grad = _exported(module, positions, dtype)
            assert math.isfinite(float(energy)), (i, dtype, float(energy))
            assert np.isfinite(grad).all(), (i, dtype)


def test_wrong_shape_is_rejected_with_a_message(exported):
    module = load_exported(exported).module
    with pytest.raises(Exception, match=r"expected positions of shape \(22, 3\)"):
        module(torch.zeros(21, 3, dtype=torch.float64, requires_grad=True))


def test_metadata_is_stored_in_the_file(model, exported):
    loaded = load_exported(exported)
    assert loaded.temperature == 300.0 and loaded.n_atoms == 22 and loaded.format == EXPORT_FORMAT
    assert loaded.outputs_forces and read_export_metadata(exported)["outputs"] == "energy_forces"
    topology, positions = loaded.topology()
    assert topology.getNumAtoms() == 22 and positions.shape == (22, 3)
    assert [a.element.symbol for a in topology.atoms()][:3] == ["H", "C", "H"]
    meta = read_export_metadata(exported)
    assert meta["torch_version"] == torch.__version__ and meta["topology_pdb"] == model.topology_pdb
    assert is_exported_file(exported)


@pytest.mark.filterwarnings("ignore:.*torch.jit.script. is deprecated:DeprecationWarning")
def test_export_from_checkpoint_is_atomic_and_rejects_bad_input(model, tmp_path, alanine_md):
    ckpt = tmp_path / "model.ckpt"
    save_checkpoint({"format": CHECKPOINT_FORMAT, "metadata": model.metadata(), "model": model.state_dict()}, ckpt)
    out = export_potential(ckpt, tmp_path / "sub" / "model.pt")
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.pt"]  # no temporary files left
    positions = alanine_md["positions"][9]
    assert load_exported(out).energy(positions) == pytest.approx(_eager(model, positions)[0], rel=1e-12)
    assert not is_exported_file(ckpt)
    with pytest.raises(ValueError, match="already an exported TorchScript file"):
        export_potential(out, tmp_path / "again.pt")
    with pytest.raises(ValueError, match="temperature"):
        export_potential(model, tmp_path / "bad.pt", temperature=-1.0)
    with pytest.raises(FileNotFoundError):
        export_potential(tmp_path / "missing.ckpt", tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a flowforce export"):
        read_export_metadata(_plain_torchscript(tmp_path / "plain.pt"))


def _plain_torchscript(path):
    class Zero(torch.nn.Module):
        def forward(self, positions: torch.Tensor) -> torch.Tensor:
            return positions.sum() * 0.0

    torch.jit.script(Zero()).save(str(path))
    return path


def test_cli_export(model, tmp_path, capsys):
    from openmm_flowforce.cli.main import main

    ckpt = tmp_path / "model.ckpt"
    save_checkpoint({"format": CHECKPOINT_FORMAT, "metadata": model.metadata(), "model": model.state_dict()}, ckpt)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "m.pt"), "--temperature", "310"]) == 0
    assert "22 particles" in capsys.readouterr().out
    assert load_exported(tmp_path / "m.pt").temperature == 310.0
    assert main(["export", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "n.pt")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_module_needs_positions_that_require_grad(exported, alanine_md):
    """OpenMM-torch hands in positions with requires_grad=True; without it the message says what to do."""
    module = load_exported(exported).module
    with pytest.raises(Exception, match=r"positions must require grad.*requires_grad_\(\)"):
        module(torch.as_tensor(alanine_md["positions"][4]))


@pytest.mark.filterwarnings(r"ignore:.*torch\.jit\.\w+. is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_energy_only_files_from_before_still_load(model, tmp_path, alanine_md):
    """A file whose module returns the energy only (written before forces moved into the module)."""
    from openmm_flowforce.export.torchscript import _EnergyCore, save_exported

    class EnergyOnly(torch.nn.Module):
        def __init__(self, core: torch.nn.Module):
            super().__init__()
            self.core = core

        def forward(self, positions: torch.Tensor) -> torch.Tensor:
            return self.core(positions.to(torch.float64).unsqueeze(0)).reshape(()).to(positions.dtype)

    traced = torch.jit.trace(_EnergyCore(model, 300.0), torch.as_tensor(alanine_md["positions"][:1]), check_trace=False)
    metadata = {"format": EXPORT_FORMAT, "temperature": 300.0, "n_atoms": 22, "torch_version": torch.__version__}
    old = save_exported(torch.jit.script(EnergyOnly(traced)), metadata, model.topology_pdb, tmp_path / "old.pt")
    assert "outputs" not in read_export_metadata(old)
    loaded = load_exported(old)
    assert not loaded.outputs_forces
    positions = alanine_md["positions"][2]
    energy, forces = loaded.energy_and_forces(positions)
    want_energy, want_grad = _eager(model, positions)
    assert float(energy) == pytest.approx(want_energy, rel=1e-12)
    np.testing.assert_allclose(-forces.numpy(), want_grad, rtol=1e-10, atol=1e-8)


def test_export_takes_the_temperature_of_the_model_file(model, tmp_path, capsys):
    from openmm_flowforce.cli.main import main

    ckpt = tmp_path / "hot.ckpt"
    save_checkpoint({"format": CHECKPOINT_FORMAT, "metadata": {**model.metadata(), "temperature": 350.0},
                     "model": model.state_dict()}, ckpt)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "hot.pt")]) == 0
    assert load_exported(tmp_path / "hot.pt").temperature == 350.0
    assert "warning" not in capsys.readouterr().err
    assert main(["export", str(ckpt), "--out", str(tmp_path / "cold.pt"), "--temperature", "300"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "fitted to data at 350 K" in err and "not the system at 300 K" in err, err
    assert load_exported(tmp_path / "cold.pt").temperature == 300.0
