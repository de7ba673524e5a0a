"""Protein-scale reference data: GBn2 solvent, hydrogen-mass repartitioning, parallel resumable
replicas written into one dataset, CG-mapped datasets and `flowforce cg` on them.

Real OpenMM throughout. The chignolin (CLN025) file is the shared one
($FLOWFORCE_SHARED_DATA/cln025/cln025.pdb, else ../shared/data next to the repository); the
tests that need it are skipped without it. Replica runs in the default set use the built-in
alanine dipeptide on the Reference platform (bit-reproducible, seconds); the chignolin
GBn2 + HMR replica run is marked slow.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

openmm = pytest.importorskip("openmm")
parmed = pytest.importorskip("parmed")
from openmm import unit  # noqa: E402

from openmm_flowforce.cli.main import main  # noqa: E402
from openmm_flowforce.coordinates.cg_mapping import CGMapping  # noqa: E402
from openmm_flowforce.data.dataset import load_dataset, save_dataset  # noqa: E402
from openmm_flowforce.md.replicas import kabsch_rmsd, replica_seeds, work_folder  # noqa: E402
from openmm_flowforce.md.systems import SystemInputError, default_timestep_fs, load_system  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("FLOWFORCE_SHARED_DATA") or ROOT.parent / "shared" / "data")
CLN025 = SHARED_DATA / "cln025" / "cln025.pdb"
needs_cln025 = pytest.mark.skipif(not CLN025.is_file(), reason=f"chignolin file not found at {CLN025}")

#: A tiny replica run of alanine dipeptide: 2 replicas x 20 frames, one from the input and one
#: from an unfolded start (0.5 ps at 600 K), on the Reference platform (bit-reproducible).
TINY_REPLICAS = ["md", "--replicas", "2", "--workers", "2", "--time-ns", "0.002", "--save-every-ps", "0.1",
                 "--equilibration-ps", "0.2", "--unfold-ps", "0.5", "--platform", "Reference", "--no-progress"]


def energy_and_forces(system, positions_nm: np.ndarray) -> tuple[float, np.ndarray]:
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(np.asarray(positions_nm, dtype=np.float64) * unit.nanometer)
    state = context.getState(getEnergy=True, getForces=True)
    return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))


def masses(system) -> np.ndarray:
    return np.array([system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(system.getNumParticles())])


@pytest.fixture(scope="module")
def chignolin():
    if not CLN025.is_file():
        pytest.skip(f"chignolin file not found at {CLN025}")
    return {solvent: load_system(pdb=str(CLN025), solvent=solvent) for solvent in ("vacuum", "gbn2")}


# -- GBn2 and HMR ------------------------------------------------------------------------------
@needs_cln025
def test_gbn2_system_has_the_gbn2_force_and_consistent_forces(chignolin):
    topology, system, x = chignolin["gbn2"]
    assert system.getNumParticles() == topology.getNumAtoms() == 175
    gb = [f for f in system.getForces() if isinstance(f, openmm.CustomGBForce)]
    assert len(gb) == 1  # GBn2 is a CustomGBForce with the neck-correction table index per atom
    names = [gb[0].getPerParticleParameterName(i) for i in range(gb[0].getNumPerParticleParameters())]
    assert "radindex" in names and names[0] == "charge"
    vacuum, _ = energy_and_forces(chignolin["vacuum"][1], x)
    gbn2, forces = energy_and_forces(system, x)
    # CLN025 carries charge -2: solvation lowers the energy by hundreds of kJ/mol (-1158 here).
    assert gbn2 - vacuum < -500.0
    # The forces the data record are -grad of this energy: a directional finite difference.
    direction = forces / np.linalg.norm(forces)
    h = 1e-5
    e_plus, _ = energy_and_forces(system, x + h * direction)
    e_minus, _ = energy_and_forces(system, x - h * direction)
    assert (e_minus - e_plus) / (2 * h) == pytest.approx(np.linalg.norm(forces), rel=1e-4)


@needs_cln025
def test_hmr_moves_mass_from_heavy_atoms_to_their_hydrogens(chignolin):
    topology, plain, _ = chignolin["gbn2"]
    _, heavy_h, _ = load_system(pdb=str(CLN025), solvent="gbn2", constraints="hbonds", hydrogen_mass=1.5)
    before, after = masses(plain), masses(heavy_h)
    hydrogen = np.array([a.element is not None and a.element.symbol == "H" for a in topology.atoms()])
    gained = np.zeros(len(before))
    for a, b in topology.bonds():
        for h_atom, other in ((a, b), (b, a)):
            if hydrogen[h_atom.index] and not hydrogen[other.index]:
                gained[other.index] += 1.5 - before[h_atom.index]
    np.testing.assert_allclose(after[hydrogen], 1.5, rtol=0, atol=1e-12)
    np.testing.assert_allclose(after[~hydrogen], before[~hydrogen] - gained[~hydrogen], rtol=0, atol=1e-9)
    assert (after[~hydrogen] < before[~hydrogen]).sum() == (gained[~hydrogen] > 0).sum() > 0
    assert after.sum() == pytest.approx(before.sum(), rel=0, abs=1e-9)
    assert heavy_h.getNumConstraints() == hydrogen.sum()  # every hydrogen of chignolin is bonded to a heavy atom


def test_hmr_on_the_parmed_route(tmp_path):
    topology, system, positions = load_system()
    structure = parmed.openmm.load_topology(topology, system, xyz=positions * 10.0)
    structure.save(str(tmp_path / "ala.prmtop"))
    structure.save(str(tmp_path / "ala.inpcrd"))
    _, plain, _ = load_system(prmtop=str(tmp_path / "ala.prmtop"), inpcrd=str(tmp_path / "ala.inpcrd"))
    _, heavy_h, _ = load_system(prmtop=str(tmp_path / "ala.prmtop"), inpcrd=str(tmp_path / "ala.inpcrd"),
                                hydrogen_mass=2.0)
    hydrogen = np.array([a.element.symbol == "H" for a in topology.atoms()])
    np.testing.assert_allclose(masses(heavy_h)[hydrogen], 2.0, atol=1e-9)
    assert masses(heavy_h).sum() == pytest.approx(masses(plain).sum(), abs=1e-9)


def test_default_timesteps_and_bad_hydrogen_mass():
    assert [default_timestep_fs(c, h) for c in ("none", "hbonds") for h in (None, 1.5)] == [1.0, 2.0, 2.0, 4.0]
    for bad in (1.0, 5.0, float("nan")):
        with pytest.raises(SystemInputError, match="--hydrogen-mass"):
            load_system(hydrogen_mass=bad)


# -- helpers of the replica runner ---------------------------------------------------------------
def test_replica_seeds_and_rmsd():
    seeds = {replica_seeds(0, i) for i in range(50)} | {replica_seeds(1, i) for i in range(50)}
    assert len(seeds) == 100 and all(0 < s < 2**31 for pair in seeds for s in pair)
    assert replica_seeds(7, 3) == replica_seeds(7, 3)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 3))
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))  # a rotation
    assert kabsch_rmsd(a @ q.T + 5.0, a) == pytest.approx(0.0, abs=1e-7)
    b = a + rng.normal(scale=0.1, size=a.shape)
    assert kabsch_rmsd(b, a) <= np.sqrt(((b - a) ** 2).sum(axis=1).mean()) + 1e-12


# -- CG-mapped datasets ---------------------------------------------------------------------------
@needs_cln025
@pytest.mark.parametrize("preset", ["ca", "residue-com"])
def test_cg_mapped_dataset_round_trip(chignolin, preset, tmp_path):
    topology, system, x = chignolin["vacuum"]
    rng = np.random.default_rng(1)
    frames = x + rng.normal(scale=0.005, size=(4, *x.shape))
    forces = rng.normal(scale=500.0, size=frames.shape)
    mapping = CGMapping.from_topology(topology, preset)
    out = tmp_path / "cg.npz"
    save_dataset(out, topology=None, positions=mapping.map_positions(frames), forces=mapping.map_forces(forces),
                 energies=np.zeros(4), temperature=300.0, cg_mapping=mapping, replica=np.array([0, 0, 1, 1]),
                 provenance={"note": "synthetic"})
    data = load_dataset(out)
    assert data.mapping().to_dict() == mapping.to_dict() and data.system_xml == ""
    assert data.topology.getNumAtoms() == data.n_atoms == mapping.n_beads
    assert data.topology.getNumBonds() == len(mapping.bonds)
    np.testing.assert_allclose(data.positions, mapping.map_positions(frames), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(data.forces, mapping.map_forces(forces), rtol=1e-6, atol=1e-3)
    assert data.replica.tolist() == [0, 0, 1, 1] and data.provenance == {"note": "synthetic"}
    # A CG dataset cannot carry the all-atom System, and all-atom frames are refused.
    with pytest.raises(ValueError, match="all-atom System"):
        save_dataset(tmp_path / "bad.npz", topology=None, positions=mapping.map_positions(frames),
                     energies=np.zeros(4), temperature=300.0, cg_mapping=mapping, system=system)
    with pytest.raises(ValueError, match="map them first"):
        save_dataset(tmp_path / "bad.npz", topology=None, positions=frames, energies=np.zeros(4),
                     temperature=300.0, cg_mapping=mapping)
    assert not (tmp_path / "bad.npz").exists()


@needs_cln025
def test_damaged_cg_fields_are_refused_naming_the_file(chignolin, tmp_path):
    topology, _, x = chignolin["vacuum"]
    mapping = CGMapping.from_topology(topology, "ca")
    good = tmp_path / "good.npz"
    save_dataset(good, topology=None, positions=mapping.map_positions(x[None]), energies=np.zeros(1),
                 temperature=300.0, cg_mapping=mapping, replica=np.array([0]), provenance={})
    arrays = dict(np.load(good))
    other = CGMapping.from_topology(topology, "backbone").to_dict()
    for key, value, expected in (("provenance", "{not json", "provenance is not valid JSON"),
                                 ("provenance", "[1, 2]", "provenance must be a JSON object"),
                                 ("replica", np.array([0, 1], dtype=np.int32), r"replica must be \(1,\)"),
                                 ("replica", np.array([-1], dtype=np.int32), "non-negative"),
                                 ("cg_mapping", json.dumps(other), "cg_mapping has 32 beads but the frames have 10"),
                                 ("cg_mapping", json.dumps({"format": "x"}), "cg_mapping is not a valid CG mapping")):
        bad = tmp_path / f"bad_{key}.npz"
        np.savez(bad, **{**arrays, key: np.array(value)})
        with pytest.raises(ValueError, match=expected) as caught:
            load_dataset(bad)
        assert str(bad) in str(caught.value)


def test_old_dataset_files_load_as_before(tmp_path):
    topology, system, x = load_system()
    save_dataset(tmp_path / "old.npz", topology=topology, positions=x[None], energies=np.zeros(1), temperature=300.0)
    with np.load(tmp_path / "old.npz") as npz:
        assert set(npz.files) == {"format", "positions", "energies", "temperature", "topology_pdb", "source"}
    data = load_dataset(tmp_path / "old.npz")
    assert data.replica is None and data.provenance == {} and data.cg_mapping is None and data.mapping() is None


# -- replica runs through the CLI -------------------------------------------------------------------
@pytest.fixture(scope="module")
def cg_replicas(tmp_path_factory):
    """A 2 x 2 replica run of alanine dipeptide saved CG-mapped (backbone), parts kept."""
    folder = tmp_path_factory.mktemp("replicas")
    out = folder / "ala_cg.npz"
    assert main([*TINY_REPLICAS, "--save-cg", "backbone", "--keep-parts", "--out", str(out)]) == 0
    return out


def test_replicas_write_one_dataset_with_provenance(cg_replicas):
    data = load_dataset(cg_replicas)
    assert data.n_frames == 40 and data.n_atoms == 5 and data.replica.tolist() == [0] * 20 + [1] * 20
    assert data.mapping().source == {"preset": "backbone"}
    replicas = data.provenance["replicas"]
    assert [r["start"] for r in replicas] == ["input", "unfolded"]
    assert [r["seed"] for r in replicas] == [replica_seeds(0, 0)[0], replica_seeds(0, 1)[0]]
    assert all(r["platform"] == "Reference" and r["frames"] == 20 for r in replicas)
    # 200 equilibration + 2000 production steps at 1 fs; the unfolded start adds 500 at 600 K.
    assert [r["steps"] for r in replicas] == [2200, 2700]
    assert replicas[0]["start_rmsd_nm"] < 1e-6 < replicas[1]["start_rmsd_nm"]
    assert data.provenance["ns_per_day"]["Reference"]["ns_per_day_per_replica"] > 0
    assert data.provenance["settings"]["unfold_temperature"] == 600.0


def test_resume_runs_only_the_missing_replica_and_gives_the_same_data(cg_replicas, capsys):
    parts = work_folder(cg_replicas)
    first = dict(np.load(cg_replicas))
    (parts / "replica-00001.npz").unlink()  # as if the run had been interrupted during replica 1
    capsys.readouterr()
    assert main([*TINY_REPLICAS, "--save-cg", "backbone", "--out", str(cg_replicas)]) == 0
    assert "1 run now, 1 already done" in capsys.readouterr().out
    again = dict(np.load(cg_replicas))
    for key in ("positions", "forces", "energies", "replica", "cg_mapping", "topology_pdb"):
        np.testing.assert_array_equal(again[key], first[key])
    old, new = (json.loads(str(d["provenance"]))["replicas"] for d in (first, again))
    assert new[0] == old[0]  # replica 0 was read from its part, not run again (same wall time)
    assert new[1]["wall_time_s"] != old[1]["wall_time_s"]  # replica 1 was run again, to the same frames
    assert not parts.exists()  # removed once the dataset is written (no --keep-parts)


def test_cg_trains_on_a_pre_mapped_dataset(cg_replicas, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text("cg_train: {steps: 5, batch_size: 16}\nnet: {hidden: [8]}\n")
    out = tmp_path / "cg.ckpt"
    code = main(["cg", str(cg_replicas), "--method", "force-matching", "--config", str(config), "--quiet",
                 "--out", str(out)])
    assert code == 0 and "backbone (stored in the dataset): 22 atoms -> 5 beads" in capsys.readouterr().out
    assert out.is_file()
    code = main(["cg", str(cg_replicas), "--mapping", "ca", "--out", str(tmp_path / "other.ckpt")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot be mapped again" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "other.ckpt").exists()


def test_single_run_with_hmr_saves_cg_frames(tmp_path, capsys):
    out = tmp_path / "one.npz"
    assert main(["md", "--hmr", "--save-cg", "backbone", "--time-ns", "0.002", "--save-every-ps", "0.2",
                 "--equilibration-ps", "0", "--platform", "Reference", "--no-progress", "--out", str(out)]) == 0
    assert "saved as 5 backbone beads" in capsys.readouterr().out
    data = load_dataset(out)
    assert data.timestep_fs == 4.0 and data.n_frames == 10 and data.n_atoms == 5 and data.replica is None
    assert "--hmr --hydrogen-mass 1.5" in data.source and "--constraints hbonds" in data.source
    assert data.provenance["ns_per_day"]["Reference"]["ns_per_day_per_replica"] > 0
    assert data.provenance["steps"] == 500


def test_more_workers_than_replicas_and_extending_a_run(tmp_path, capsys):
    out = tmp_path / "ext.npz"
    short = ["md", "--time-ns", "0.0005", "--save-every-ps", "0.1", "--equilibration-ps", "0", "--starts", "input",
             "--platform", "Reference", "--no-progress", "--workers", "3", "--out", str(out)]
    assert main([*short, "--replicas", "1", "--keep-parts"]) == 0
    first = load_dataset(out)
    assert first.provenance["workers"] == 3 and first.replica.tolist() == [0] * 5
    capsys.readouterr()
    # The same command with more replicas keeps the finished one (seeds depend on the index only).
    assert main([*short, "--replicas", "2"]) == 0
    assert "1 run now, 1 already done" in capsys.readouterr().out
    extended = load_dataset(out)
    assert extended.replica.tolist() == [0] * 5 + [1] * 5
    np.testing.assert_array_equal(extended.positions[:5], first.positions)
    assert not np.array_equal(extended.positions[5:], first.positions)


@pytest.mark.parametrize("workers", ["1", pytest.param("2", marks=pytest.mark.slow)])
def test_replicas_that_blow_up_are_reported_and_nothing_is_assembled(workers, tmp_path, capsys):
    out = tmp_path / "bad.npz"
    code = main(["md", "--replicas", "2", "--workers", workers, "--timestep-fs", "20", "--time-ns", "0.002",
                 "--save-every-ps", "0.1", "--equilibration-ps", "0", "--starts", "input", "--platform", "Reference",
                 "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "2 of 2 replicas failed (replica 0: input start: the potential energy became nan" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    assert not list(work_folder(out).glob("replica-*.npz"))


@pytest.mark.parametrize("argv, expected", [
    (["--replicas", "0"], "argument --replicas: must be an integer ≥ 1"),
    (["--replicas", "2", "--workers", "0"], "argument --workers"),
    (["--save-cg", "martini"], "argument --save-cg: invalid choice"),
    (["--replicas", "2", "--starts", "input,melted"], "unknown start kind melted"),
    (["--workers", "2"], "--workers apply to replica runs; add --replicas N"),
    (["--replicas", "2", "--dcd", "x.dcd"], "--dcd is for a single run"),
    (["--hydrogen-mass", "2"], "--hydrogen-mass 2 applies only with --hmr"),
    (["--hmr", "--hydrogen-mass", "9"], "--hydrogen-mass 9: must be above"),
    (["--replicas", "2", "--unfold-ps", "0.0005"], "--unfold-ps"),
])
def test_bad_replica_inputs_exit_2_with_one_line(argv, expected, tmp_path, capsys):
    out = tmp_path / "x.npz"
    code = main(["md", *argv, "--time-ns", "0.001", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_parts_of_another_run_are_refused(tmp_path, capsys):
    out = tmp_path / "x.npz"
    folder = work_folder(out)
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format": "openmm-flowforce/md-replica-part/1",
                                                      "fingerprint": {"data": "other", "options": {}}}))
    code = main([*TINY_REPLICAS, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "holds replicas of another run" in err and not out.exists()
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"]


# -- slow: chignolin GBn2 + HMR, and a real interruption ----------------------------------------------
@needs_cln025
@pytest.mark.slow  # ~1 min on two shared cores: two chignolin minimisations, four worker processes
def test_chignolin_gbn2_hmr_replicas_cg_equals_mapped_all_atom(tmp_path, capsys):
    common = ["md", "--pdb", str(CLN025), "--solvent", "gbn2", "--hmr", "--replicas", "2", "--workers", "2",
              "--time-ns", "0.002", "--save-every-ps", "0.2", "--equilibration-ps", "0.4", "--unfold-ps", "2",
              "--platform", "CPU", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "aa.npz")]) == 0
    assert "CPU" in capsys.readouterr().out
    assert main([*common, "--save-cg", "backbone", "--out", str(tmp_path / "cg.npz")]) == 0
    aa, cg = load_dataset(tmp_path / "aa.npz"), load_dataset(tmp_path / "cg.npz")
    assert aa.timestep_fs == 4.0 and aa.n_atoms == 175 and aa.n_frames == 20
    # 100 equilibration + 500 production steps of 4 fs; the unfolded start adds 500 at 600 K.
    assert [r["steps"] for r in aa.provenance["replicas"]] == [600, 1100]
    assert aa.provenance["replicas"][1]["start_rmsd_nm"] > 0.05  # 2 ps at 600 K moved the structure
    # One thread per worker on CPU: the CG run is the all-atom run, mapped by the workers.
    mapping = cg.mapping()
    np.testing.assert_allclose(cg.positions, mapping.map_positions(aa.positions), rtol=0, atol=1e-6)
    np.testing.assert_allclose(cg.forces, mapping.map_forces(aa.forces), rtol=1e-5, atol=1e-2)
    config = tmp_path / "tiny.yaml"
    config.write_text("cg_train: {steps: 5, batch_size: 8}\nnet: {hidden: [8]}\n")
    assert main(["cg", str(tmp_path / "cg.npz"), "--method", "force-matching", "--config", str(config), "--quiet",
                 "--out", str(tmp_path / "cln.ckpt")]) == 0


@pytest.mark.slow  # a real SIGTERM to a real `flowforce md` process: ~30 s
def test_sigterm_keeps_finished_replicas_and_the_rerun_completes(tmp_path):
    argv = [sys.executable, "-m", "openmm_flowforce.cli.main", "md", "--replicas", "3", "--workers", "2",
            "--time-ns", "0.02", "--equilibration-ps", "0", "--starts", "input", "--platform", "Reference",
            "--no-progress", "--out", str(tmp_path / "x.npz")]
    process = subprocess.Popen(argv, cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    parts = work_folder(tmp_path / "x.npz")
    deadline = time.time() + 120
    while not list(parts.glob("replica-*.npz")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted (SIGTERM)" in err and "run the same command again" in err
    assert not (tmp_path / "x.npz").exists()
    finished = sorted(p.name for p in parts.glob("replica-*.npz"))
    assert 1 <= len(finished) < 3 and not list(parts.glob("*.tmp"))
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env={**os.environ,
                                                                                   "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and f"{len(finished)} already done" in done.stdout
    assert load_dataset(tmp_path / "x.npz").replica.tolist() == [0] * 20 + [1] * 20 + [2] * 20
