"""Reference data: systems from every input kind, reference MD, the dataset file, `flowforce md`."""
from __future__ import annotations

import io

import numpy as np
import pytest

openmm = pytest.importorskip("openmm")
parmed = pytest.importorskip("parmed")
from openmm import app, unit  # noqa: E402

from openmm_flowforce.cli.main import main  # noqa: E402
from openmm_flowforce.data import alanine_dipeptide_pdb  # noqa: E402
from openmm_flowforce.data.dataset import load_dataset, save_dataset  # noqa: E402
from openmm_flowforce.md.reference import derive_seeds, run_reference_md  # noqa: E402
from openmm_flowforce.md.systems import SystemInputError, load_system  # noqa: E402

# A few hundred steps: 10 frames every 30 fs after 100 fs of equilibration.
TINY = dict(time_ns=0.0003, save_every_ps=0.03, equilibration_ps=0.1, progress=False)


def evaluate(system, positions_nm: np.ndarray) -> tuple[float, np.ndarray]:
    """Potential energy (kJ/mol) and forces (kJ/mol/nm) on the Reference platform."""
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(np.asarray(positions_nm, dtype=np.float64) * unit.nanometer)
    state = context.getState(getEnergy=True, getForces=True)
    return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))


@pytest.fixture(scope="module")
def alanine():
    return load_system()


@pytest.fixture(scope="module")
def parmed_files(alanine, tmp_path_factory):
    """AMBER, GROMACS and CHARMM files of the amber14 alanine dipeptide, written by parmed."""
    topology, system, positions = alanine
    folder = tmp_path_factory.mktemp("parmed")
    structure = parmed.openmm.load_topology(topology, system, xyz=positions * 10.0)
    names = {}
    for key, name in (("prmtop", "ala.prmtop"), ("inpcrd", "ala.inpcrd"), ("top", "ala.top"), ("gro", "ala.gro"),
                      ("psf", "ala.psf"), ("crd", "ala.crd")):
        structure.save(str(folder / name))
        names[key] = str(folder / name)
    parmed.charmm.CharmmParameterSet.from_structure(structure).write(par=str(folder / "ala.prm"),
                                                                     top=str(folder / "ala.rtf"))
    names["toppar"] = [str(folder / "ala.rtf"), str(folder / "ala.prm")]
    structure[":1"].save(str(folder / "ace.inpcrd"))  # 6 atoms: coordinates of another molecule
    names["short_inpcrd"] = str(folder / "ace.inpcrd")
    return names


# --- systems ---------------------------------------------------------------------------

def test_default_is_builtin_alanine_with_flexible_bonds(alanine):
    topology, system, positions = alanine
    assert topology.getNumAtoms() == system.getNumParticles() == positions.shape[0] == 22
    assert system.getNumConstraints() == 0
    assert not any(isinstance(f, openmm.NonbondedForce) and f.getNonbondedMethod() != f.NoCutoff
                   for f in system.getForces())
    assert load_system(constraints="hbonds")[1].getNumConstraints() == 12  # 12 X–H bonds


@pytest.mark.parametrize("solvent", ["vacuum", "implicit"])
def test_pdb_route_equals_builtin(solvent):
    _, builtin, positions = load_system(system="alanine-dipeptide", solvent=solvent)
    _, from_pdb, pdb_positions = load_system(pdb=alanine_dipeptide_pdb(), forcefield=["amber14-all.xml"],
                                             solvent=solvent)
    np.testing.assert_array_equal(positions, pdb_positions)
    e_builtin, e_pdb = evaluate(builtin, positions)[0], evaluate(from_pdb, positions)[0]
    assert e_pdb == pytest.approx(e_builtin, rel=1e-12)
    vacuum = evaluate(load_system()[1], positions)[0]
    assert (e_builtin == pytest.approx(vacuum, rel=1e-12)) == (solvent == "vacuum")


@pytest.mark.parametrize("route", ["amber", "gromacs"])
def test_parmed_routes_match_amber14(route, alanine, parmed_files):
    _, reference, positions = alanine
    files = {"amber": dict(prmtop=parmed_files["prmtop"], inpcrd=parmed_files["inpcrd"]),
             "gromacs": dict(top=parmed_files["top"], gro=parmed_files["gro"])}[route]
    topology, system, loaded = load_system(**files)
    assert topology.getNumAtoms() == 22
    np.testing.assert_allclose(loaded, positions, atol=1e-3)  # .gro keeps 3 decimals (nm)
    e_ref, f_ref = evaluate(reference, positions)
    e, f = evaluate(system, positions)
    assert e == pytest.approx(e_ref, rel=1e-4)
    np.testing.assert_allclose(f, f_ref, rtol=0, atol=1e-4 * np.abs(f_ref).max())
    # OBC2 through parmed: GB radii come from the topology file, so only check it is on.
    _, implicit, _ = load_system(**files, solvent="implicit")
    assert any("GB" in type(force).__name__ for force in implicit.getForces())


def test_charmm_route_loads(parmed_files, alanine):
    _, _, positions = alanine
    for coordinates in ({"crd": parmed_files["crd"]}, {"pdb": alanine_dipeptide_pdb()}):
        topology, system, loaded = load_system(psf=parmed_files["psf"], toppar=parmed_files["toppar"],
                                               **coordinates)
        assert system.getNumParticles() == topology.getNumAtoms() == 22
        np.testing.assert_allclose(loaded, positions, atol=1e-3)
        assert np.isfinite(evaluate(system, positions)[0])


@pytest.mark.parametrize("kwargs, expected", [
    (dict(psf="ala.psf", crd="ala.crd"), "--psf also needs --toppar"),
    (dict(psf="ala.psf", toppar=["x.prm"]), "exactly one of --crd FILE or --pdb FILE"),
    (dict(prmtop="ala.prmtop"), "--prmtop also needs --inpcrd"),
    (dict(prmtop="missing.prmtop", inpcrd="missing.inpcrd"), "--prmtop missing.prmtop: does not exist"),
    (dict(system="villin"), "choose one of alanine-dipeptide"),
    (dict(system="alanine-dipeptide", forcefield=["amber99.xml"]), "unknown force field file"),
    (dict(system="alanine-dipeptide", prmtop="a", inpcrd="b"), "--system and --prmtop cannot be combined"),
    (dict(top="a.top", gro="a.gro", forcefield=["amber14-all.xml"]), "--forcefield cannot be used with --top"),
    (dict(inpcrd="a.inpcrd"), "--inpcrd given without a system"),
    (dict(solvent="water"), "--solvent water: unknown; choose one of vacuum, implicit"),
    (dict(constraints="all"), "--constraints all: unknown; choose one of none, hbonds"),
])
def test_bad_system_input_names_problem_and_fix(kwargs, expected):
    with pytest.raises(SystemInputError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        load_system(**kwargs)


def test_atom_count_mismatch(parmed_files):
    with pytest.raises(SystemInputError, match="--prmtop has 22 atoms but --inpcrd has 6"):
        load_system(prmtop=parmed_files["prmtop"], inpcrd=parmed_files["short_inpcrd"])


# --- reference MD and the dataset file -----------------------------------------------------

@pytest.mark.parametrize("solvent", ["vacuum", "implicit"])
def test_reference_md_writes_valid_dataset(solvent, tmp_path):
    topology, system, positions = load_system(solvent=solvent)
    result = run_reference_md(topology, system, positions, **TINY)
    assert not result["interrupted"] and result["error"] is None
    assert result["timestep_fs"] == 1.0
    path = tmp_path / "data.npz"
    save_dataset(path, topology=topology, positions=result["positions"], forces=result["forces"],
                 energies=result["energies"], temperature=300.0, timestep_fs=result["timestep_fs"],
                 save_every_ps=result["save_every_ps"], source=f"test {solvent}")
    data = load_dataset(path)
    assert data.positions.shape == data.forces.shape == (10, 22, 3)
    assert data.positions.dtype == data.forces.dtype == np.float32
    assert data.energies.shape == (10,) and data.temperature == 300.0
    assert (data.timestep_fs, data.save_every_ps, data.source) == (1.0, 0.03, f"test {solvent}")
    assert data.topology.getNumAtoms() == 22 and data.topology.getNumBonds() == topology.getNumBonds()
    assert np.isfinite(data.positions).all() and np.isfinite(data.forces).all()
    assert len(np.unique(data.energies)) == 10  # the molecule moves
    for frame in (0, 9):
        energy, forces = evaluate(system, data.positions[frame])
        assert data.energies[frame] == pytest.approx(energy, rel=1e-3)
        np.testing.assert_allclose(data.forces[frame], forces, rtol=0, atol=1e-3 * np.abs(forces).max())


def test_hbond_constraints_default_to_2fs(alanine):
    topology, system, positions = load_system(constraints="hbonds")
    result = run_reference_md(topology, system, positions, **TINY)
    assert result["timestep_fs"] == 2.0 and len(result["energies"]) == 10


def test_same_seed_same_trajectory(alanine):
    topology, system, positions = alanine
    runs = [run_reference_md(topology, system, positions, seed=seed, platform="Reference", **TINY)
            for seed in (0, 0, 1)]
    np.testing.assert_array_equal(runs[0]["positions"], runs[1]["positions"])
    np.testing.assert_array_equal(runs[0]["forces"], runs[1]["forces"])
    assert not np.allclose(runs[0]["positions"], runs[2]["positions"])
    assert 0 not in derive_seeds(0)  # OpenMM would pick a random seed for 0


def test_interrupt_keeps_the_frames_so_far(alanine, tmp_path, monkeypatch):
    topology, system, positions = alanine
    calls = {"n": 0}
    get_state = openmm.Context.getState

    def interrupting(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # 1 call after minimisation, then one per frame
            raise KeyboardInterrupt
        return get_state(self, *args, **kwargs)

    monkeypatch.setattr(openmm.Context, "getState", interrupting)
    dcd = tmp_path / "part.dcd"
    result = run_reference_md(topology, system, positions, dcd=dcd, **TINY)
    assert result["interrupted"] and result["positions"].shape == (3, 22, 3) and result["energies"].shape == (3,)
    assert dcd.is_file() and not list(tmp_path.glob(".*.tmp"))
    monkeypatch.undo()
    import mdtraj

    assert mdtraj.load(str(dcd), top=alanine_dipeptide_pdb()).n_frames == 3


def test_bad_md_settings(alanine):
    topology, system, positions = alanine
    with pytest.raises(ValueError, match="multiple of the time step"):
        run_reference_md(topology, system, positions, save_every_ps=0.0015, time_ns=0.0015, progress=False)
    with pytest.raises(ValueError, match="platform 'Metal' is not available"):
        run_reference_md(topology, system, positions, platform="Metal", **TINY)


@pytest.fixture
def arrays(alanine):
    """A valid dataset as keyword arrays for np.savez (3 frames)."""
    topology, system, positions = alanine
    rng = np.random.default_rng(0)
    frames = positions[None] + 0.002 * rng.standard_normal((3, 22, 3))
    evaluated = [evaluate(system, x) for x in frames]
    buffer = io.StringIO()
    app.PDBFile.writeFile(topology, positions * 10.0 * unit.angstrom, buffer)
    return {"positions": frames.astype(np.float32),
            "forces": np.array([f for _, f in evaluated], dtype=np.float32),
            "energies": np.array([e for e, _ in evaluated]), "temperature": np.array(300.0),
            "topology_pdb": np.array(buffer.getvalue())}


def test_hand_made_npz_loads(arrays, tmp_path):
    np.savez(tmp_path / "ok.npz", **arrays)
    data = load_dataset(tmp_path / "ok.npz")
    assert data.n_frames == 3 and data.n_atoms == 22 and data.timestep_fs is None
    del arrays["forces"]
    np.savez(tmp_path / "noforces.npz", **arrays)
    assert load_dataset(tmp_path / "noforces.npz").forces is None


@pytest.mark.parametrize("change, expected", [
    (lambda a: a.pop("energies"), "missing energies"),
    (lambda a: a["positions"].__setitem__((2, 5, 0), np.nan), "frame 2 of positions contain NaN"),
    (lambda a: a["forces"].__setitem__((1, 0, 1), np.inf), "frame 1 of forces contain NaN"),
    (lambda a: a.__setitem__("positions", a["positions"] * 10), "look like Ångström .* divide them by 10"),
    (lambda a: a.update(positions=a["positions"][:, :21], forces=a["forces"][:, :21]),
     "topology has 22 atoms but positions have 21"),
    (lambda a: a.__setitem__("forces", a["forces"][:, :21]), r"forces have shape \(3, 21, 3\) but positions"),
    (lambda a: a.__setitem__("energies", a["energies"][:2]), r"energies must have shape \(3,\)"),
    (lambda a: a.__setitem__("box", np.ones(3)), "unknown keys box"),
])
def test_dataset_validation_errors(arrays, tmp_path, change, expected):
    change(arrays)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=expected) as info:
        load_dataset(path)
    assert str(path) in str(info.value)


def test_save_refuses_what_would_not_load(arrays, alanine, tmp_path):
    positions = arrays["positions"].copy()
    positions[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="frame 1 of positions"):
        save_dataset(tmp_path / "x.npz", topology=alanine[0], positions=positions, energies=arrays["energies"],
                     temperature=300.0)
    assert not (tmp_path / "x.npz").exists()


def test_corrupt_files(arrays, tmp_path):
    np.savez(tmp_path / "ok.npz", **arrays)
    good = (tmp_path / "ok.npz").read_bytes()
    for name, content in (("garbage.npz", b"not a zip file at all"), ("truncated.npz", good[: len(good) // 2])):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{tmp_path / name} is not a flowforce .npz dataset: it is corrupt"):
            load_dataset(tmp_path / name)
    np.save(tmp_path / "single.npy", arrays["positions"])
    with pytest.raises(ValueError, match="single.npy is not a flowforce .npz dataset.*a single .npy array"):
        load_dataset(tmp_path / "single.npy")
    with pytest.raises(FileNotFoundError, match="missing.npz does not exist"):
        load_dataset(tmp_path / "missing.npz")


# --- the command line --------------------------------------------------------------------

def test_cli_end_to_end(tmp_path, capsys):
    import mdtraj

    out, dcd = tmp_path / "ala.npz", tmp_path / "traj" / "ala.dcd"
    (tmp_path / "traj").mkdir()
    code = main(["md", "--time-ns", "0.0002", "--save-every-ps", "0.02", "--equilibration-ps", "0.1",
                 "--seed", "3", "--out", str(out), "--dcd", str(dcd), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "frames      10 x 22 atoms" in printed and "ns/day" in printed and "kJ/mol" in printed
    data = load_dataset(out)
    assert data.positions.shape == (10, 22, 3) and "--seed 3" in data.source
    trajectory = mdtraj.load(str(dcd), top=alanine_dipeptide_pdb())
    assert trajectory.n_frames == 10
    np.testing.assert_allclose(trajectory.xyz, data.positions, atol=1e-5)


def test_cli_ctrl_c_saves_frames_so_far(tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    get_state = openmm.Context.getState

    def interrupting(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return get_state(self, *args, **kwargs)

    monkeypatch.setattr(openmm.Context, "getState", interrupting)
    out = tmp_path / "part.npz"
    code = main(["md", "--time-ns", "0.0002", "--save-every-ps", "0.02", "--equilibration-ps", "0.1",
                 "--out", str(out), "--no-progress"])
    monkeypatch.undo()
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert load_dataset(out).n_frames == 3


@pytest.mark.parametrize("argv, expected", [
    (["--system", "villin"], "unknown built-in system"),
    (["--prmtop", "nope.prmtop"], "--prmtop also needs --inpcrd"),
    (["--time-ns", "-1"], "argument --time-ns: must be a number > 0, got '-1'"),
])
def test_cli_bad_input_exit_2_without_traceback(argv, expected, tmp_path, capsys):
    code = main(["md", *argv, "--out", str(tmp_path / "x.npz"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err
    assert not (tmp_path / "x.npz").exists()
