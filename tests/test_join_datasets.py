"""Joining datasets run apart (``flowforce convert a.npz b.npz``, several .npz to train/cg):
frames, replicas, provenance and the System kept; mismatches refused with one line."""
from __future__ import annotations

import json

import numpy as np
import openmm
import pytest
from openmm import unit

from openmm_flowforce.cli.main import main
from openmm_flowforce.data.dataset import load_dataset, save_dataset
from openmm_flowforce.data.trajectory import load_data
from openmm_flowforce.errors import FlowforceError
from openmm_flowforce.targets.molecules import builtin_molecule_system


def _write(path, n: int, seed: int, solvent: str = "vacuum", temperature: float = 300.0, forces: bool = True,
           replica=None, provenance=None, timestep_fs: float = 2.0):
    """n perturbed alanine-dipeptide frames with their energies and forces from an OpenMM Context."""
    topology, system, positions = builtin_molecule_system("alanine-dipeptide", solvent)
    rng = np.random.default_rng(seed)
    frames = positions[None] + 0.003 * rng.standard_normal((n, *positions.shape))
    context = openmm.Context(system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference"))
    energies, all_forces = [], []
    for frame in frames:
        context.setPositions(frame)
        state = context.getState(getEnergy=True, getForces=True)
        energies.append(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
        all_forces.append(state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))
    save_dataset(path, topology=topology, positions=frames, energies=np.array(energies), temperature=temperature,
                 forces=np.array(all_forces) if forces else None, timestep_fs=timestep_fs, save_every_ps=1.0,
                 source=f"test seed {seed}", system=system, replica=replica, provenance=provenance)
    return path


@pytest.fixture()
def pair(tmp_path):
    records = [{"replica": r, "seed": 10 + r, "ns_per_day": 30.0} for r in (0, 1)]
    a = _write(tmp_path / "a.npz", 4, 0, replica=np.array([0, 0, 1, 1]), provenance={"replicas": records})
    b = _write(tmp_path / "b.npz", 3, 1, timestep_fs=4.0)
    return a, b


def test_join_keeps_frames_replicas_provenance_and_the_system(pair):
    a, b = pair
    joined = load_data([a, b])
    da, db = load_dataset(a), load_dataset(b)
    np.testing.assert_array_equal(joined.positions, np.concatenate([da.positions, db.positions]))
    np.testing.assert_array_equal(joined.forces, np.concatenate([da.forces, db.forces]))
    np.testing.assert_array_equal(joined.energies, np.concatenate([da.energies, db.energies]))
    assert joined.replica.tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert [r["replica"] for r in joined.provenance["replicas"]] == [0, 1]
    assert [j["replica_offset"] for j in joined.provenance["joined"]] == [0, 2]
    assert joined.system_xml == da.system_xml != ""
    assert joined.timestep_fs is None and joined.save_every_ps == 1.0  # 2 fs vs 4 fs: dropped; 1 ps kept
    assert str(a) in joined.source and str(b) in joined.source


def test_convert_writes_the_join_and_commands_read_several_npz(pair, tmp_path, capsys):
    a, b = pair
    out = tmp_path / "all.npz"
    assert main(["convert", str(a), str(b), "--out", str(out)]) == 0
    assert "7 frames" in capsys.readouterr().out
    written = load_dataset(out)
    direct = load_data([a, b])
    np.testing.assert_array_equal(written.positions, direct.positions)
    assert written.replica.tolist() == direct.replica.tolist()
    assert written.system_xml == direct.system_xml
    assert json.loads(json.dumps(written.provenance)) == direct.provenance
    # a single md dataset keeps its System through convert (it was dropped before)
    single = tmp_path / "single.npz"
    assert main(["convert", str(a), "--out", str(single)]) == 0
    assert load_dataset(single).system_xml == load_dataset(a).system_xml


@pytest.mark.parametrize("kind", ["temperature", "system", "forces"])
def test_mismatched_datasets_are_refused_naming_both_files(pair, tmp_path, capsys, kind):
    a, _ = pair
    other = {"temperature": dict(temperature=350.0), "system": dict(solvent="implicit"),
             "forces": dict(forces=False)}[kind]
    c = _write(tmp_path / "c.npz", 2, 5, **other)
    with pytest.raises(FlowforceError, match="cannot join") as error:
        load_data([a, c])
    assert str(a) in str(error.value) and str(c) in str(error.value)
    out = tmp_path / "bad.npz"
    assert main(["convert", str(a), str(c), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot join" in err[0]
    assert not out.exists()


def test_npz_and_trajectory_files_are_not_mixed(pair, tmp_path):
    from openmm_flowforce.errors import OptionError

    a, _ = pair
    with pytest.raises(OptionError, match="not both"):
        load_data([a, tmp_path / "run.dcd"])
