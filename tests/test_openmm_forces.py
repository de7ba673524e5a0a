"""The flow potential inside OpenMM: both force backends against the eager model, finite
differences, NVE energy conservation next to Amber, saving Systems, and the CLI."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from openmm_flowforce.export.backends import BACKENDS, LEARNED_FORCE_NAME, resolve_backend
from openmm_flowforce.export.torchscript import export_potential
from openmm_flowforce.openmm import create_system, load_system, make_force, save_system
from openmm_flowforce.potentials import BoltzmannGenerator
from openmm_flowforce.training import TrainConfig, Trainer

KJ, NM = unit.kilojoule_per_mole, unit.nanometer


def _train_and_export(alanine_md, folder, **flow):
    """A small model (``flow`` options over 2 layers, hidden 16, 4 components) trained for 50
    NLL steps, its trainer checkpoint and its export at 300 K."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        x = torch.as_tensor(alanine_md["positions"][:1200])
        bg = BoltzmannGenerator.from_topology(alanine_md["topology"], x.numpy(),
                                              **{"n_layers": 2, "hidden": 16, "n_components": 4, **flow})
        ckpt = folder / "model.ckpt"
        Trainer(bg, {"nll": 1.0}, data={"x": x}, checkpoint=ckpt, metadata=bg.metadata(),
                config=TrainConfig(steps=50, batch_size=128, lr=1e-3, validate_every=0)).run()
        pt = export_potential(bg, folder / "model.pt", temperature=300.0)
    finally:
        torch.set_default_dtype(old)
    return bg.eval(), ckpt, pt


@pytest.fixture(scope="module")
def trained(alanine_md, tmp_path_factory):
    """The smooth model trained for 50 NLL steps (≈ 1 nat better than the fitted marginals),
    its trainer checkpoint and its export at 300 K."""
    return _train_and_export(alanine_md, tmp_path_factory.mktemp("flowforce"))


def _eager(model, positions):
    x = torch.as_tensor(positions, dtype=torch.float64)[None].requires_grad_(True)
    energy = model.to(torch.float64).energy(x, 300.0)
    (grad,) = torch.autograd.grad(energy.sum(), x)
    return float(energy.detach()), -grad[0].numpy()


def _context(system, platform="Reference", integrator=None):
    integrator = integrator or openmm.VerletIntegrator(0.001)
    return openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform))


def _energy_forces(context, positions):
    context.setPositions(positions)
    state = context.getState(getEnergy=True, getForces=True)
    return (state.getPotentialEnergy().value_in_unit(KJ),
            state.getForces(asNumpy=True).value_in_unit(KJ / NM))


@pytest.mark.parametrize("backend", ["torchforce", "pythonforce"])
@pytest.mark.parametrize("platform", ["Reference", "CPU", pytest.param("CUDA", marks=pytest.mark.gpu)])
def test_context_energy_and_forces_equal_the_eager_model(trained, alanine_md, backend, platform):
    model, _, pt = trained
    system = create_system(alanine_md["topology"], pt, backend=backend)
    context = _context(system, platform)
    for frame in (0, 600, 1400):
        positions = alanine_md["positions"][frame]
        energy, forces = _energy_forces(context, positions)
        want_energy, want_forces = _eager(model, positions)
        assert energy == pytest.approx(want_energy, rel=1e-5)
        np.testing.assert_allclose(forces, want_forces, rtol=1e-5, atol=1e-5 * np.abs(want_forces).max())


def test_directional_finite_difference_of_the_context_energy(trained, alanine_md):
    _, _, pt = trained
    context = _context(create_system(alanine_md["topology"], pt, backend="torchforce"))
    positions = alanine_md["positions"][100]
    _, forces = _energy_forces(context, positions)
    norm = np.linalg.norm(forces)
    direction = forces / norm
    h = 1e-5  # nm
    e_plus, _ = _energy_forces(context, positions + h * direction)
    e_minus, _ = _energy_forces(context, positions - h * direction)
    # ΔE along F̂ ≈ −|F|·h (central difference, error O(h²))
    assert (e_plus - e_minus) / (2 * h) == pytest.approx(-norm, rel=1e-6)


def test_backend_registry_and_force_options(trained):
    model, ckpt, pt = trained
    with pytest.raises(ValueError, match="valid: auto, torchforce, pythonforce"):
        make_force(pt, backend="openmm-ml")
    assert resolve_backend("auto").name == "torchforce"  # openmm-torch works in this environment
    assert set(BACKENDS) == {"torchforce", "pythonforce", "native"}
    force = make_force(pt, backend="torchforce", cuda_graphs=True)
    assert force.getName() == LEARNED_FORCE_NAME and not force.usesPeriodicBoundaryConditions()
    assert force.getProperties()["useCUDAGraphs"] == "true"
    with pytest.raises(ValueError, match="cuda_graphs"):
        make_force(model, backend="pythonforce", cuda_graphs=True)
    with pytest.raises(ValueError, match="exported at 300 K"):
        make_force(pt, temperature=310.0)
    assert make_force(ckpt, backend="pythonforce", temperature=310.0).getName() == LEARNED_FORCE_NAME


def test_create_system_checks_the_topology(trained, alanine_md):
    _, _, pt = trained
    topology = alanine_md["topology"]
    system = create_system(topology, pt, backend="pythonforce")
    assert [system.getParticleMass(i) for i in range(22)] == [a.element.mass for a in topology.atoms()]
    assert system.getNumForces() == 1 and system.getNumConstraints() == 0

    smaller = app.Modeller(topology, alanine_md["positions"][0] * NM)
    smaller.delete([list(smaller.topology.atoms())[-1]])
    with pytest.raises(ValueError, match="21 atoms but the model was trained on 22"):
        create_system(smaller.topology, pt)

    no_element = app.Topology()
    residue = no_element.addResidue("X", no_element.addChain())
    for i in range(22):
        no_element.addAtom(f"X{i}", None, residue)
    with pytest.raises(ValueError, match="has no element"):
        create_system(no_element, pt)


def _nve(system, positions, steps, dt_fs, every=10):
    """Total energies (kJ/mol) every ``every`` steps and the mean kinetic energy."""
    integrator = openmm.VerletIntegrator(dt_fs * unit.femtosecond)
    context = _context(system, integrator=integrator)
    context.setPositions(positions)
    context.setVelocitiesToTemperature(300 * unit.kelvin, 11)
    total, kinetic = [], []
    for i in range(steps // every + 1):
        state = context.getState(getEnergy=True)
        total.append((state.getPotentialEnergy() + state.getKineticEnergy()).value_in_unit(KJ))
        kinetic.append(state.getKineticEnergy().value_in_unit(KJ))
        if i < steps // every:
            integrator.step(every)
    total, mean_kinetic = np.array(total), float(np.mean(kinetic))
    q = len(total) // 10
    return {"max_deviation": float(np.abs(total - total[0]).max()) / mean_kinetic,  # fluctuation + drift
            "drift": abs(float(total[-q:].mean() - total[:q].mean())) / mean_kinetic}


def test_nve_energy_conservation_is_like_amber(trained, alanine_md):
    """Velocity Verlet, 2000 steps of 0.5 fs from the same frame and velocities' temperature.

    Both measures are relative to the mean kinetic energy (the potentials' zero points
    differ). Measured (Reference, torch 2.12, this model; normal-CDF internal coordinates,
    identity blend c ≈ 0.99 at initialisation):
      amber:  max |E − E₀|/⟨K⟩ = 0.055,  |⟨E⟩_last10% − ⟨E⟩_first10%|/⟨K⟩ = 0.0018
      flow:   max |E − E₀|/⟨K⟩ = 0.019,  drift = 0.010
    See BENCHMARKS.md for the time-step study (0.5 fs vs 1 fs) with trained models.
    """
    _, _, pt = trained
    start = alanine_md["positions"][1300]
    amber = _nve(alanine_md["system"], start, 2000, 0.5)
    flow = _nve(create_system(alanine_md["topology"], pt, backend="torchforce"), start, 2000, 0.5)
    print(f"amber {amber}, flow {flow}")
    assert flow["max_deviation"] < 10 * amber["max_deviation"] + 0.01
    assert flow["drift"] < 10 * amber["drift"] + 0.01


@pytest.mark.slow
def test_nve_energy_conservation_of_an_ispline_flow_is_like_amber(alanine_md, tmp_path):
    """The same check for the C³ I-spline family (forces C², continuous across the torsions' wrap).

    Measured (Reference, torch 2.12): see BENCHMARKS.md, "I-spline flows and inverse stability".
    """
    _, _, pt = _train_and_export(alanine_md, tmp_path, transform="ispline")
    start = alanine_md["positions"][1300]
    amber = _nve(alanine_md["system"], start, 2000, 0.5)
    flow = _nve(create_system(alanine_md["topology"], pt, backend="torchforce"), start, 2000, 0.5)
    print(f"amber {amber}, ispline flow {flow}")
    assert flow["max_deviation"] < 10 * amber["max_deviation"] + 0.01
    assert flow["drift"] < 10 * amber["drift"] + 0.01


@pytest.mark.parametrize("backend", ["torchforce", "pythonforce"])
def test_save_and_load_system_round_trip(trained, alanine_md, tmp_path, backend):
    model, _, pt = trained
    system = create_system(alanine_md["topology"], model, backend=backend)
    system.getForce(0).setForceGroup(3)
    path = save_system(system, tmp_path / "system.xml")
    text = path.read_text()
    assert "openmm_flowforce:" in text and "<Force " not in text  # the learned force is left out
    loaded = load_system(path, pt, backend=backend)
    assert loaded.getForce(0).getForceGroup() == 3 and loaded.getForce(0).getName() == LEARNED_FORCE_NAME
    positions = alanine_md["positions"][42]
    assert _energy_forces(_context(loaded), positions)[0] == pytest.approx(
        _energy_forces(_context(system), positions)[0], rel=1e-12)
    # The saved file is a plain System (no learned force) for XmlSerializer too.
    assert openmm.XmlSerializer.deserialize(text).getNumForces() == 0


def test_plain_xml_of_a_torchforce_system_is_refused_and_crashes_a_child(trained, alanine_md, tmp_path):
    """Plain ``XmlSerializer.deserialize`` of a System with a TorchForce, in a child process:
    recorded with openmm 8.6.1 / openmm-torch 1.10 / torch 2.12: the child dies of SIGSEGV."""
    _, _, pt = trained
    system = create_system(alanine_md["topology"], pt, backend="torchforce")
    path = tmp_path / "plain.xml"
    path.write_text(openmm.XmlSerializer.serialize(system))  # serialising works
    with pytest.raises(ValueError, match="contains a TorchForce"):
        load_system(path, pt)  # refuses instead of crashing this process
    child = textwrap.dedent(f"""
        import openmm, openmmtorch
        system = openmm.XmlSerializer.deserialize(open({str(path)!r}).read())
        print("DESERIALIZED", system.getNumForces(), flush=True)
    """)
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    crashed = result.returncode < 0 or result.returncode > 128
    worked = result.returncode == 0 and "DESERIALIZED 1" in result.stdout
    assert crashed or worked, (result.returncode, result.stderr[-500:])
    print(f"plain deserialisation of a TorchForce System: returncode {result.returncode} "
          f"({'crashed' if crashed else 'worked'})")


def test_pythonforce_system_survives_plain_xml(trained, alanine_md):
    model, _, _ = trained
    system = create_system(alanine_md["topology"], model, backend="pythonforce")
    copy = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))  # computation is picklable
    positions = alanine_md["positions"][7]
    assert _energy_forces(_context(copy), positions)[0] == pytest.approx(_eager(model, positions)[0], rel=1e-12)


def test_cli_export_and_simulate(trained, alanine_md, tmp_path, capsys):
    import mdtraj

    from openmm_flowforce.cli import simulate as cli_simulate
    from openmm_flowforce.cli.main import main
    from openmm_flowforce.md.simulate import PLATFORMS

    assert cli_simulate.PLATFORMS == PLATFORMS
    _, ckpt, _ = trained
    pt, top = tmp_path / "model.pt", tmp_path / "top.pdb"
    with open(top, "w") as handle:
        app.PDBFile.writeFile(alanine_md["topology"], alanine_md["positions"][0] * NM, handle)
    assert main(["export", str(ckpt), "--out", str(pt)]) == 0
    out, log = tmp_path / "traj.dcd", tmp_path / "log.csv"
    assert main(["simulate", str(pt), "--topology", str(top), "--steps", "300", "--platform", "Reference",
                 "--timestep-fs", "0.5", "--out", str(out), "--report", str(log)]) == 0
    assert "300 steps at 300 K on Reference (torchforce)" in capsys.readouterr().out
    traj = mdtraj.load(str(out), top=str(top))
    assert traj.n_frames == 3 and traj.n_atoms == 22 and np.isfinite(traj.xyz).all()
    lines = log.read_text().splitlines()
    assert len(lines) == 4 and "Potential Energy" in lines[0]

    smaller = app.Modeller(alanine_md["topology"], alanine_md["positions"][0] * NM)
    smaller.delete([list(smaller.topology.atoms())[-1]])
    wrong = tmp_path / "wrong.pdb"
    with open(wrong, "w") as handle:
        app.PDBFile.writeFile(smaller.topology, smaller.positions, handle)
    assert main(["simulate", str(pt), "--topology", str(wrong), "--steps", "10", "--out", str(tmp_path / "w.dcd")]) == 2
    err = capsys.readouterr().err
    assert "21 atoms but the model was trained on 22" in err and "Traceback" not in err


def test_simulation_that_blows_up_stops_and_saves_the_last_good_state(trained, alanine_md, tmp_path):
    from openmm_flowforce.md.simulate import SimulationBlewUp, simulate

    _, _, pt = trained
    top = tmp_path / "top.pdb"
    with open(top, "w") as handle:
        app.PDBFile.writeFile(alanine_md["topology"], alanine_md["positions"][0] * NM, handle)
    # A limit of 1e-6 kT per atom: the first check after the start fails.
    with pytest.raises(SimulationBlewUp, match=r"blew up at step 20: potential energy .* kJ/mol") as info:
        simulate(pt, top, 100, tmp_path / "traj.dcd", platform="Reference", report_interval=20,
                 explosion_factor=1e-6, progress=False)
    assert info.value.step == 20 and info.value.last_good_pdb == tmp_path / "traj.last_good.pdb"
    saved = app.PDBFile(str(info.value.last_good_pdb))
    np.testing.assert_allclose(saved.getPositions(asNumpy=True).value_in_unit(NM), alanine_md["positions"][0],
                               atol=1e-3)  # step 0 = the start, to PDB precision
    assert str(info.value.last_good_pdb) in str(info.value)


def test_microseconds_per_step_of_both_backends(trained, alanine_md):
    """Recorded on this 2-core CPU machine (Reference, one torch thread), this 2-layer model:
    torchforce ≈ 3.5 ms/step, pythonforce (eager) ≈ 6 ms/step: the cost is the model's ~650
    small tensor operations forward and backward, not the backend overhead (~50 µs)."""
    import time

    model, _, pt = trained
    timings = {}
    for backend, source in (("torchforce", pt), ("pythonforce", model)):
        integrator = openmm.VerletIntegrator(0.0005)
        context = _context(create_system(alanine_md["topology"], source, backend=backend), integrator=integrator)
        context.setPositions(alanine_md["positions"][0])
        integrator.step(5)
        start = time.perf_counter()
        integrator.step(40)
        timings[backend] = 1e6 * (time.perf_counter() - start) / 40
    print(f"µs/step: {timings}")
    assert all(np.isfinite(list(timings.values())))
