"""Trajectories as users have them: DCD/XTC/gro/PDB read by mdtraj into the same Dataset the
``.npz`` path gives, forces from a separate array, strides, selections, several files, clear
errors for mismatches; ``flowforce convert`` and ``flowforce train`` on a DCD.

Precision: DCD stores float32 Å (positions agree to 1e-5 nm), XTC rounds to 1e-3 nm.
"""
from __future__ import annotations

import numpy as np
import pytest

mdtraj = pytest.importorskip("mdtraj")
from openmm import app, unit  # noqa: E402

from openmm_flowforce.cli.main import main  # noqa: E402
from openmm_flowforce.data.dataset import load_dataset  # noqa: E402
from openmm_flowforce.data.trajectory import load_data  # noqa: E402
from openmm_flowforce.errors import FlowforceError, OptionError  # noqa: E402

N_FRAMES = 60


@pytest.fixture(scope="module")
def files(alanine_md, tmp_path_factory):
    """PDB, gro, DCD and XTC of the first 60 frames, and their forces as .npy."""
    folder = tmp_path_factory.mktemp("traj")
    pdb = folder / "ala.pdb"
    with open(pdb, "w") as handle:
        app.PDBFile.writeFile(alanine_md["topology"], alanine_md["positions"][0] * unit.nanometer, handle)
    top = mdtraj.load_topology(str(pdb))
    traj = mdtraj.Trajectory(alanine_md["positions"][:N_FRAMES], top)
    traj.save_dcd(str(folder / "ala.dcd"))
    traj.save_xtc(str(folder / "ala.xtc"))
    traj[:1].save_gro(str(folder / "ala.gro"))
    np.save(folder / "forces.npy", alanine_md["forces"][:N_FRAMES])
    return folder


def test_dcd_with_forces_and_stride_is_the_npz_dataset(files, alanine_md):
    data = load_data(files / "ala.dcd", topology=files / "ala.pdb", forces=files / "forces.npy", stride=3,
                     temperature=300 * unit.kelvin)
    np.testing.assert_allclose(data.positions, alanine_md["positions"][:N_FRAMES:3], atol=1e-5)
    np.testing.assert_allclose(data.forces, alanine_md["forces"][:N_FRAMES:3], rtol=1e-6, atol=1e-3)
    assert data.positions.dtype == np.float32 and data.forces.dtype == np.float32
    assert data.temperature == 300.0 and data.n_atoms == 22
    assert [a.element for a in data.topology.atoms()] == [a.element for a in alanine_md["topology"].atoms()]
    assert data.topology.getNumBonds() == alanine_md["topology"].getNumBonds()


def test_xtc_with_a_gro_topology_several_files_and_a_selection(files, alanine_md):
    data = load_data([files / "ala.xtc", files / "ala.xtc"], topology=files / "ala.gro")
    assert data.n_frames == 2 * N_FRAMES and data.forces is None and data.temperature == 300.0
    np.testing.assert_allclose(data.positions[N_FRAMES:], alanine_md["positions"][:N_FRAMES], atol=1.1e-3)
    heavy = load_data(files / "ala.dcd", topology=files / "ala.pdb", selection="not element H",
                      forces=files / "forces.npy")
    assert heavy.n_atoms == 10 and heavy.forces.shape == (N_FRAMES, 10, 3)
    index = [a.index for a in alanine_md["topology"].atoms() if a.element.symbol != "H"]
    np.testing.assert_allclose(heavy.forces, alanine_md["forces"][:N_FRAMES][:, index], rtol=1e-6, atol=1e-3)


def test_mismatches_are_clear_errors(files, alanine_md, tmp_path):
    two = tmp_path / "two.pdb"
    modeller = app.Modeller(alanine_md["topology"], alanine_md["positions"][0] * unit.nanometer)
    modeller.add(alanine_md["topology"], (alanine_md["positions"][0] + 1.0) * unit.nanometer)
    with open(two, "w") as handle:
        app.PDBFile.writeFile(modeller.topology, modeller.positions, handle)
    with pytest.raises(FlowforceError, match="has 22 atoms per frame but the topology .* has 44"):
        load_data(files / "ala.dcd", topology=two)
    np.save(tmp_path / "short.npy", alanine_md["forces"][:10])
    with pytest.raises(FlowforceError, match=r"forces of shape \(10, 22, 3\) but the trajectory has 60 frames"):
        load_data(files / "ala.dcd", topology=files / "ala.pdb", forces=tmp_path / "short.npy")
    with pytest.raises(OptionError, match="give its topology"):
        load_data(files / "ala.dcd")
    with pytest.raises(OptionError, match="selects no atoms"):
        load_data(files / "ala.dcd", topology=files / "ala.pdb", selection="resname HOH")
    with pytest.raises(OptionError, match="temperature must be a temperature"):
        load_data(files / "ala.dcd", topology=files / "ala.pdb", temperature=3 * unit.nanometer)


def test_cli_convert_writes_the_npz_and_npz_rejects_trajectory_options(files, alanine_md, tmp_path, capsys):
    out = tmp_path / "ala.npz"
    assert main(["convert", str(files / "ala.dcd"), "--topology", str(files / "ala.pdb"), "--forces",
                 str(files / "forces.npy"), "--stride", "2", "--temperature", "310", "--out", str(out)]) == 0
    data = load_dataset(out)
    assert data.n_frames == N_FRAMES // 2 and data.temperature == 310.0 and data.forces is not None
    np.testing.assert_allclose(data.positions, alanine_md["positions"][:N_FRAMES:2], atol=1e-5)
    assert "energies not given" in data.source
    capsys.readouterr()
    assert main(["train", str(out), "--topology", str(files / "ala.pdb"), "--out", str(tmp_path / "m.ckpt"),
                 "--steps", "1"]) == 2
    assert "--topology apply to trajectory files" in capsys.readouterr().err


def test_cli_train_reads_a_dcd_directly(files, tmp_path):
    out = tmp_path / "model.ckpt"
    assert main(["train", str(files / "ala.dcd"), "--topology", str(files / "ala.pdb"), "--forces",
                 str(files / "forces.npy"), "--out", str(out), "--steps", "2", "--batch-size", "16", "--quiet"]) == 0
    assert out.is_file()


def test_cli_evaluate_reads_a_reference_trajectory_like_its_npz(files, alanine_md, tmp_path):
    import json

    from openmm_flowforce.coordinates.cg_mapping import CGMapping

    mapping = CGMapping.from_topology(alanine_md["topology"], "backbone")
    beads = mapping.map_positions(alanine_md["positions"][N_FRAMES:2 * N_FRAMES])
    cg_pdb = tmp_path / "cg.pdb"
    mapping.write_pdb(cg_pdb, beads[0])
    mdtraj.Trajectory(beads.astype(np.float32), mdtraj.load(str(cg_pdb)).topology).save_dcd(str(tmp_path / "cg.dcd"))
    npz = tmp_path / "ref.npz"
    assert main(["convert", str(files / "ala.dcd"), "--topology", str(files / "ala.pdb"), "--out", str(npz)]) == 0
    reports = []
    for reference in ([str(npz)], [str(files / "ala.dcd"), "--reference-topology", str(files / "ala.pdb")]):
        out = tmp_path / f"report{len(reports)}.json"
        assert main(["evaluate", str(tmp_path / "cg.dcd"), "--topology", str(cg_pdb), "--reference", *reference,
                     "--bins", "12", "--out", str(out)]) == 0
        reports.append(json.loads(out.read_text())["divergences_nats"])
    assert reports[0] == pytest.approx(reports[1], abs=1e-12)
