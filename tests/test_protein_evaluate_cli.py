"""``flowforce evaluate --protein`` end to end on chignolin (CLN025) frames, and its one-line
errors for bad input.

The frames are real chignolin structures: the hairpin of ``tests/data/cln025_hairpin.pdb``
(the "folded" structure here) and the extended frame of the shared ``cln025.pdb``, superposed,
with frames in between by linear interpolation and 0.01 nm of Gaussian noise on every atom.
The interpolation parameter follows a scripted folded/unfolded sequence, so the folded
fraction and the numbers of events are known.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from openmm_flowforce.cli.main import main

HAIRPIN = Path(__file__).parent / "data" / "cln025_hairpin.pdb"
SHARED_DATA = Path(os.environ.get("FLOWFORCE_SHARED_DATA")
                   or Path(__file__).resolve().parent.parent.parent / "shared" / "data")
EXTENDED = SHARED_DATA / "cln025" / "cln025.pdb"

#: Scripted states of the reference, 15 frames each: F U F U F U -> 2 folding, 3 unfolding events.
REFERENCE_STATES = [0, 1, 0, 1, 0, 1]
FRAMES_PER_STATE = 15


def _superposed(mobile: np.ndarray, target: np.ndarray) -> np.ndarray:
    a, b = mobile - mobile.mean(0), target - target.mean(0)
    u, _, vt = np.linalg.svd(a.T @ b)
    d = np.sign(np.linalg.det(u @ vt))
    return a @ (u @ np.diag([1.0, 1.0, d]) @ vt) + target.mean(0)


def _frames(states: list[int], seed: int, folded: np.ndarray, extended: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    s = np.repeat(np.asarray(states, float), FRAMES_PER_STATE)
    s = np.clip(s + rng.normal(scale=0.05, size=len(s)), 0.0, 1.0)  # in-state wobble along the path
    x = (1 - s)[:, None, None] * folded + s[:, None, None] * extended
    return (x + rng.normal(scale=0.01, size=x.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def cln025_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not EXTENDED.is_file():
        pytest.skip(f"shared data not found at {EXTENDED}")
    import mdtraj
    from openmm import app

    from openmm_flowforce.coordinates.cg_mapping import CGMapping
    from openmm_flowforce.data.dataset import save_dataset

    d = tmp_path_factory.mktemp("cln025")
    hairpin = app.PDBFile(str(HAIRPIN))
    folded = np.asarray(hairpin.getPositions(asNumpy=True)._value)
    extended = _superposed(np.asarray(app.PDBFile(str(EXTENDED)).getPositions(asNumpy=True)._value), folded)
    reference = _frames(REFERENCE_STATES, 0, folded, extended)
    save_dataset(d / "ref.npz", topology=hairpin.topology, positions=reference, energies=np.zeros(len(reference)),
                 temperature=300.0, save_every_ps=10.0, source="test: interpolated CLN025 frames")
    mapping = CGMapping.from_topology(hairpin.topology, "ca")
    ca = mapping.map_positions(reference.astype(np.float64))
    mapping.write_pdb(d / "cg.pdb", ca[0])
    mdtraj.Trajectory(ca.astype(np.float32), mdtraj.load(str(d / "cg.pdb")).topology).save_dcd(str(d / "same.dcd"))
    only_folded = mapping.map_positions(_frames([0, 0, 0, 0], 1, folded, extended).astype(np.float64))
    cg_text = mapping.pdb_text(only_folded[0])
    # Two replicas of 30 samples (flat (n, 3N) positions, as flowforce sample writes them).
    np.savez(d / "folded_samples.npz", positions=only_folded.reshape(len(only_folded), -1).astype(np.float32),
             topology_pdb=np.array(cg_text), replica=np.repeat([0, 1], 30))
    np.savez(d / "other_protein.npz", positions=only_folded, topology_pdb=np.array(cg_text.replace("TRP", "ALA")))
    np.savez(d / "no_topology.npz", positions=only_folded)
    eight = CGMapping.from_topology(hairpin.topology, selection="name CA and resid 1 to 8")
    np.savez(d / "eight_beads.npz", positions=eight.map_positions(reference.astype(np.float64)),
             topology_pdb=np.array(eight.pdb_text(eight.map_positions(folded))))
    return {"d": d, "ref": d / "ref.npz", "cg_pdb": d / "cg.pdb", "same": d / "same.dcd",
            "folded_samples": d / "folded_samples.npz"}


def _evaluate(f: dict[str, Path], model: Path, *extra: str, out: str = "report.json") -> tuple[int, Path]:
    path = f["d"] / out
    argv = ["evaluate", "--protein", str(model), "--reference", str(f["ref"]), "--folded", str(HAIRPIN),
            "--out", str(path), "--tica-lag", "2", "--blocks", "4", "--bins", "12", *extra]
    return main(argv), path


def test_protein_evaluation_of_a_model_identical_to_the_reference(cln025_files: dict[str, Path],
                                                                  capfd: pytest.CaptureFixture) -> None:
    f = cln025_files
    plots = f["d"] / "plots"
    code, out = _evaluate(f, f["same"], "--topology", str(f["cg_pdb"]), "--plots", str(plots))
    assert code == 0
    assert "dcdplugin" not in capfd.readouterr().out  # the DCD reader's C-level chatter is silenced
    report = json.loads(out.read_text())
    assert report["kind"] == "protein" and report["n_ca"] == 10
    assert report["native_contacts"]["count"] >= 8
    for name in ("reference", "model"):
        ensemble = report["ensembles"][name]
        assert ensemble["frames"] == len(REFERENCE_STATES) * FRAMES_PER_STATE
        assert ensemble["events"] == {"folding": 2, "unfolding": 3}
        fraction = ensemble["folded_fraction"]
        # The assignment is exact here (the in-state wobble stays in the cores): half the frames
        # are folded, and each of 4 time blocks holds what the script put there.
        assert fraction["value"] == pytest.approx(0.5, abs=1e-12)
        scripted = np.repeat(1 - np.asarray(REFERENCE_STATES), FRAMES_PER_STATE)
        expected = [float(b.mean()) for b in np.array_split(scripted, 4)]
        np.testing.assert_allclose(fraction["block_values"], expected, atol=1e-12)
        assert fraction["error_from"] == "4 time blocks"
        w = np.array([len(b) for b in np.array_split(scripted, 4)]) / len(scripted)
        se = np.sqrt(4 / 3 * np.sum(w ** 2 * (np.array(expected) - 0.5) ** 2))
        assert fraction["stderr"] == pytest.approx(se, rel=1e-12) and se > 0.05
    # The all-atom reference also gets the heavy-atom Q; the CG model cannot.
    assert "q_heavy_atom_mean" in report["ensembles"]["reference"]
    assert "q_heavy_atom_mean" not in report["ensembles"]["model"]
    assert report["ensembles"]["reference"]["frame_ps"] == 10.0
    # Same frames (DCD is float32 in Å): identical histograms.
    for surface in report["surfaces"].values():
        assert surface["divergences_nats"]["js"] < 1e-3
    tica = report["tica"]
    assert tica["n_features"] == 28 and tica["lagtime_frames"] == 2
    assert 0.5 < tica["eigenvalues"][0] < 1.0  # the folded/unfolded switching is slow at lag 2
    assert tica["timescales_ps"][0] == pytest.approx(tica["timescales_frames"][0] * 10.0)
    for name in ("fes_tica.png", "fes_q_rmsd.png", "q_timeseries.png"):
        data = (plots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert sorted(Path(p).name for p in report["plots"]) == ["fes_q_rmsd.png", "fes_tica.png", "q_timeseries.png"]


def test_protein_evaluation_of_an_always_folded_samples_file(cln025_files: dict[str, Path]) -> None:
    f = cln025_files
    code, out = _evaluate(f, f["folded_samples"], out="folded.json")
    assert code == 0
    report = json.loads(out.read_text())
    model = report["ensembles"]["model"]
    assert model["folded_fraction"]["value"] == 1.0 and model["events"] == {"folding": 0, "unfolding": 0}
    assert model["replicas"] == 2 and model["folded_fraction"]["error_from"] == "2 replica blocks"
    assert model["q_mean"] > 0.9 and model["rmsd_nm_mean"] < 0.05
    # Half the reference is unfolded and the model never is. Were the folded halves' histograms
    # identical, JS = ½·½ log(½/¾) + ½·½ log(½/¼) + ½ log(1/¾) = 0.216 nats; sampling noise in the
    # folded bins moves it by a few hundredths either way. A model identical to the reference
    # gives < 1e-3 (test above).
    for surface in report["surfaces"].values():
        assert 0.15 < surface["divergences_nats"]["js"] < 0.4


@pytest.mark.parametrize("extra, expected", [
    (["--plots", "{d}/p"], "--folded FOLDED.pdb"),                       # --protein without --folded: below
    (["--cv", "distance:0,4"], "--cv applies only without --protein"),
    (["--mapping", "ca"], "--mapping applies only without --protein"),
    (["--q-folded", "0.2"], "must lie below"),
    (["--tica-lag", "500"], "lag time"),
    (["--blocks", "1"], "at least 2"),
    (["--folded-extended"], "no native contacts"),
    (["--model", "{d}/no_topology.npz"], "needs positions and topology_pdb"),
    (["--model", "{d}/eight_beads.npz"], "different numbers of Cα"),
    (["--model", "{d}/same.dcd"], "need a topology"),
    (["--model", "{d}/other_protein.npz"], "different proteins"),
])
def test_protein_bad_inputs_are_one_line_errors(cln025_files: dict[str, Path], capsys: pytest.CaptureFixture,
                                                extra: list[str], expected: str) -> None:
    f = cln025_files
    d = f["d"]
    out = d / "bad.json"
    model, folded = str(f["folded_samples"]), str(HAIRPIN)
    argv_extra = [e.format(d=d) for e in extra]
    if argv_extra[0] == "--model":
        model, argv_extra = argv_extra[1], []
    if argv_extra == ["--folded-extended"]:
        folded, argv_extra = str(EXTENDED), []
    argv = ["evaluate", "--protein", model, "--reference", str(f["ref"]), "--folded", folded, "--out", str(out),
            "--tica-lag", "2", *argv_extra]
    if expected == "--folded FOLDED.pdb":
        argv = [a for a in argv if a not in ("--folded", folded)]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err, err
    assert not out.exists() and not (d / "p").exists()


def test_protein_only_options_are_refused_without_protein(cln025_files: dict[str, Path],
                                                          capsys: pytest.CaptureFixture) -> None:
    f = cln025_files
    capsys.readouterr()
    assert main(["evaluate", str(f["same"]), "--topology", str(f["cg_pdb"]), "--reference", str(f["ref"]),
                 "--out", str(f["d"] / "x.json"), "--plots", str(f["d"] / "p")]) == 2
    assert "--plots applies only with --protein" in capsys.readouterr().err
    assert main(["evaluate", str(f["same"]), "--reference", str(f["ref"]), "--out", str(f["d"] / "x.json")]) == 2
    assert "needs --topology" in capsys.readouterr().err
