"""Flow-matching coarse-graining end to end: flow forces at samples, the outlier rule,
``flowforce cg`` (both methods), CG export on both backends, CG MD, ``flowforce evaluate`` and
``flowforce demo --quick`` (float64 where a tolerance is tight)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

openmm = pytest.importorskip("openmm")
pytest.importorskip("mdtraj")

from openmm_flowforce.analysis.fes import PHI_PSI, compare_fes, divergences, parse_cv  # noqa: E402
from openmm_flowforce.cli.main import main  # noqa: E402
from openmm_flowforce.conventions import kT  # noqa: E402
from openmm_flowforce.coordinates.cg_mapping import CGMapping  # noqa: E402
from openmm_flowforce.data.dataset import save_dataset  # noqa: E402
from openmm_flowforce.potentials import BoltzmannGenerator  # noqa: E402
from openmm_flowforce.potentials.cg_net import load_cg_net  # noqa: E402
from openmm_flowforce.training.flow_matching import (drop_force_outliers, force_outlier_threshold,  # noqa: E402
                                                     max_bead_force_norm, sample_flow_forces)

T = 300.0
TINY = "flow: {n_layers: 2, hidden: [16, 16], n_components: 4}\nflow_train: {steps: 60}\nflow_samples: 400\n" \
       "net: {hidden: [16, 16]}\ncg_train: {steps: 60, validate_every: 20}\n"


@pytest.fixture(scope="module")
def mapping(alanine_md):
    return CGMapping.from_topology(alanine_md["topology"], "backbone")


@pytest.fixture(scope="module")
def cg_flow(alanine_md, mapping):
    """An untrained, non-identity Boltzmann generator over the 5 backbone beads, float64."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(1)
        x = mapping.map_positions(alanine_md["positions"])
        return BoltzmannGenerator.from_topology(mapping.cg_topology(), x, n_layers=2, hidden=16, n_components=4,
                                                identity_init=False).eval()
    finally:
        torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def data_file(alanine_md, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fm-data")
    kwargs = dict(topology=alanine_md["topology"], positions=alanine_md["positions"][::3],
                  energies=np.zeros(len(alanine_md["positions"][::3])), temperature=T)
    save_dataset(folder / "with_forces.npz", forces=alanine_md["forces"][::3], **kwargs)
    save_dataset(folder / "no_forces.npz", **kwargs)
    (folder / "tiny.yaml").write_text(TINY)
    return folder


@pytest.fixture(scope="module")
def cg_model(data_file):
    """``flowforce cg`` (flow-matching) + ``flowforce export`` on the tiny dataset."""
    out = data_file / "fm" / "cg.ckpt"
    assert main(["cg", str(data_file / "no_forces.npz"), "--out", str(out), "--config", str(data_file / "tiny.yaml"),
                 "--quiet"]) == 0
    assert main(["export", str(out), "--out", str(out.with_suffix(".pt"))]) == 0
    return out


# -- flow forces ------------------------------------------------------------------------------------
def test_backbone_flow_has_phi_psi_torsions(cg_flow):
    assert cg_flow.coordinates.dim == 9 and cg_flow.coordinates.n_atoms - 3 == 2  # 2 torsions: φ and ψ


def test_flow_forces_at_samples_are_minus_gradient_and_match_finite_differences(cg_flow):
    x, forces = sample_flow_forces(cg_flow, 16, T, batch_size=8, seed=3)
    assert x.shape == forces.shape == (16, 5, 3) and x.dtype == np.float64
    xt = torch.as_tensor(x).requires_grad_(True)
    (grad,) = torch.autograd.grad(cg_flow.energy(xt, T).sum(), xt)  # U = −kT log q
    np.testing.assert_allclose(forces, -grad.numpy(), rtol=1e-10, atol=1e-8 * np.abs(forces).max())
    # Directional finite differences: U(x − hF̂) − U(x + hF̂) ≈ 2h|F|.
    with torch.no_grad():
        for i in range(4):
            f = torch.as_tensor(forces[i])
            direction, h = f / f.norm(), 1e-6
            u_minus, u_plus = cg_flow.energy(torch.stack([xt[i] - h * direction, xt[i] + h * direction]), T)
            assert float(u_minus - u_plus) / (2 * h) == pytest.approx(float(f.norm()), rel=1e-4)


def test_force_threshold_drops_exactly_the_outliers():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(2000, 5, 3)) * 100.0
    threshold = force_outlier_threshold(reference, percentile=99.0, factor=2.0)
    assert threshold == pytest.approx(2.0 * np.percentile(max_bead_force_norm(reference), 99.0))
    forces = rng.normal(size=(100, 5, 3)) * 100.0
    planted = [3, 50, 97]
    forces[planted, 2] = [threshold * 1.01, 0.0, 0.0]
    x = rng.normal(size=forces.shape)
    x_kept, f_kept, kept = drop_force_outliers(x, forces, threshold)
    assert np.flatnonzero(~kept).tolist() == planted
    assert len(x_kept) == len(f_kept) == 97 and np.array_equal(x_kept, x[kept])
    with pytest.raises(ValueError, match="percentile"):
        force_outlier_threshold(reference, percentile=101.0)


# -- flowforce cg ---------------------------------------------------------------------------------
def test_cg_flow_matching_writes_a_self_contained_model(cg_model, mapping, capsys):
    net, stored = load_cg_net(cg_model)
    assert stored.to_dict() == mapping.to_dict() and net.n_beads == 5
    metadata = torch.load(cg_model, weights_only=True)["metadata"]
    assert metadata["temperature"] == T and metadata["method"] == "flow-matching"
    assert "ATOM" in metadata["topology_pdb"] or "HETATM" in metadata["topology_pdb"]
    info = metadata["training"]
    # The default torsion jitter adds 30 % turned points to the 400 samples.
    assert info["flow_samples"] == 400 and info["torsion_jitter_points"] == 120
    assert info["dropped_samples"] + info["training_frames"] == 520
    assert cg_model.with_suffix(".pdb").exists()
    assert cg_model.with_name("cg.flow.ckpt").exists() and cg_model.with_name("cg.samples.npz").exists()


def test_cg_force_matching_and_its_errors(data_file, capsys):
    out = data_file / "fmatch" / "cg.ckpt"
    assert main(["cg", str(data_file / "with_forces.npz"), "--out", str(out), "--method", "force-matching",
                 "--config", str(data_file / "tiny.yaml"), "--quiet"]) == 0
    assert torch.load(out, weights_only=True)["metadata"]["method"] == "force-matching"
    capsys.readouterr()
    assert main(["cg", str(data_file / "no_forces.npz"), "--out", str(out), "--method", "force-matching",
                 "--quiet"]) == 2
    assert "needs all-atom forces" in capsys.readouterr().err
    bad = data_file / "bad.yaml"
    bad.write_text("flow_samples: 10\nsamples: 3\n")
    assert main(["cg", str(data_file / "no_forces.npz"), "--out", str(out), "--config", str(bad)]) == 2
    assert "unknown option samples; valid: flow, flow_train, flow_samples" in capsys.readouterr().err
    bad.write_text("net: {width: 3}\n")
    assert main(["cg", str(data_file / "no_forces.npz"), "--out", str(out), "--config", str(bad)]) == 2
    assert "unknown option net.width; valid: hidden, activation, priors" in capsys.readouterr().err


# -- export and MD ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torchforce", "pythonforce"])
def test_exported_cg_model_in_an_openmm_context_equals_the_eager_net(cg_model, mapping, alanine_md, backend):
    from openmm import unit

    from openmm_flowforce.export.backends import resolve_backend
    from openmm_flowforce.export.system import create_system
    from openmm_flowforce.export.torchscript import read_export_metadata

    try:
        resolve_backend(backend)
    except ValueError as error:
        pytest.skip(str(error))
    pt = cg_model.with_suffix(".pt")
    meta = read_export_metadata(pt)
    assert meta["kind"] == "cg_energy_net" and meta["masses"] == pytest.approx(list(mapping.masses))
    topology = mapping.cg_topology()
    for atom in topology.atoms():  # stored masses are used: the beads need no element
        atom.element = None
    system = create_system(topology, str(pt), backend=backend)
    assert [system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(5)] == pytest.approx(mapping.masses)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    net, _ = load_cg_net(cg_model)
    net = net.double()
    x = mapping.map_positions(alanine_md["positions"][::300])
    energy, forces = (t.detach() for t in net.energy_and_forces(torch.as_tensor(x)))
    for i in range(len(x)):
        context.setPositions(x[i] * unit.nanometer)
        state = context.getState(getEnergy=True, getForces=True)
        e = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        f = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
        assert e == pytest.approx(float(energy[i]), rel=1e-5, abs=1e-5 * kT(T))
        np.testing.assert_allclose(f, forces[i].numpy(), rtol=1e-5, atol=1e-5 * float(forces[i].abs().max()))


def test_cg_checkpoint_needs_export_and_temperature_is_fixed(cg_model, tmp_path):
    from openmm_flowforce.export.backends import resolve_potential
    from openmm_flowforce.export.torchscript import export_potential

    with pytest.raises(ValueError, match="export it first"):
        resolve_potential(str(cg_model))
    with pytest.raises(ValueError, match="fitted at 300 K"):
        export_potential(str(cg_model), tmp_path / "x.pt", temperature=350.0)


def test_cg_simulate_and_evaluate(cg_model, data_file, tmp_path, capsys):
    pt, pdb = cg_model.with_suffix(".pt"), cg_model.with_suffix(".pdb")
    dcd = tmp_path / "cg.dcd"
    assert main(["simulate", str(pt), "--topology", str(pdb), "--steps", "400", "--timestep-fs", "5",
                 "--report-interval", "20", "--platform", "Reference", "--out", str(dcd)]) == 0
    report, png = tmp_path / "report.json", tmp_path / "fes.png"
    assert main(["evaluate", str(dcd), "--topology", str(pdb), "--reference", str(data_file / "no_forces.npz"),
                 "--out", str(report), "--plot", str(png)]) == 0
    result = json.loads(report.read_text())
    assert result["frames"]["model"] == 20 and result["cvs"] == list(PHI_PSI)
    assert all(v >= 0 for v in result["divergences_nats"].values())
    assert result["divergences_nats"]["js"] <= np.log(2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["evaluate", str(dcd), "--topology", str(pdb), "--reference", str(data_file / "no_forces.npz"),
                 "--cv", "dihedral:0,1,2,3", "--cv", "distance:0,4", "--out", str(report)]) == 0
    assert json.loads(report.read_text())["grid"][1]["unit"] == "nm"
    capsys.readouterr()
    assert main(["evaluate", str(dcd), "--topology", str(pdb), "--reference", str(data_file / "no_forces.npz"),
                 "--cv", "angle:0,1,2", "--out", str(report)]) == 2
    assert "dihedral, distance" in capsys.readouterr().err


def test_divergences_of_an_ensemble_with_itself_are_zero(alanine_md, mapping, tmp_path, capfd):
    import mdtraj

    x = mapping.map_positions(alanine_md["positions"])
    same = compare_fes(x, x)
    assert same.divergences == {"kl": 0.0, "kl_reverse": 0.0, "js": 0.0}
    shifted = compare_fes(x, x[:, ::-1])  # reversed bead order: other dihedrals
    assert shifted.divergences["js"] > 0.1 and shifted.divergences["kl"] > 0
    # Through the command line: the mapped reference written as a (float32) DCD.
    pdb = tmp_path / "cg.pdb"
    mapping.write_pdb(pdb, x[0])
    traj = mdtraj.Trajectory(x.astype(np.float32), mdtraj.load(str(pdb)).topology)
    traj.save_dcd(str(tmp_path / "ref.dcd"))
    save_dataset(tmp_path / "ref.npz", topology=alanine_md["topology"], positions=alanine_md["positions"],
                 energies=np.zeros(len(x)), temperature=T)
    assert main(["evaluate", str(tmp_path / "ref.dcd"), "--topology", str(pdb), "--reference",
                 str(tmp_path / "ref.npz"), "--out", str(tmp_path / "r.json")]) == 0
    assert "dcdplugin" not in capfd.readouterr().out  # the DCD reader's C-level chatter is silenced
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["divergences_nats"]["js"] < 1e-3
    # the same frames (float32 in the DCD): every bond and angle distribution agrees
    assert report["bonded"]["bonds_w1_max_nm"] < 1e-6 and report["bonded"]["angles_w1_max_deg"] < 1e-3
    with pytest.raises(ValueError, match="different shapes"):
        divergences(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="needs 4 distinct"):
        parse_cv("dihedral:0,1,2")
    with pytest.raises(ValueError, match="needs 2 distinct"):
        parse_cv("distance:0,0")


# -- demo ------------------------------------------------------------------------------------------
def test_demo_quick_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "JS" in printed
    report = json.loads((out / "report.json").read_text())
    assert 0 <= report["divergences_nats"]["js"] <= np.log(2)
    assert set(report["bonded"]["w1"]) == {f"bond {i}-{i + 1}" for i in range(4)} | {
        f"angle {i}-{i + 1}-{i + 2}" for i in range(3)}  # the 5 backbone beads of alanine dipeptide
    for name in ("reference.npz", "cg.ckpt", "cg.pdb", "cg.pt", "cg.dcd", "fes.png"):
        assert (out / name).exists()
    before = (out / "cg.pt").stat().st_mtime_ns
    assert main(["demo", "--quick", "--out", str(out), "--quiet"]) == 0
    timings = json.loads((out / "report.json").read_text())["timings_s"]
    assert (out / "cg.pt").stat().st_mtime_ns == before
    assert isinstance(timings["evaluate"], float)
