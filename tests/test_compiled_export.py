"""Export for speed: one energy+forces graph (strict ``torch.export``), AOTInductor packages,
their metadata, TorchForce with forces from the module, and PythonForce running a package.

Models are tiny (a 2-layer flow with hidden width 8; a 5-bead CG net with hidden width 8) so
tracing stays fast; tests that compile a package with AOTInductor (C++, tens of seconds to
minutes) are marked ``slow``.

Tolerances, and why:
* float64 graphs and packages reproduce the float64 eager model to rounding: relative 1e-9
  of the largest |U| or |F| (sums are reassociated by fusion and constant folding).
* float32 packages compute the geometry in float64 and the networks in float32
  (:mod:`openmm_flowforce.export.models`); against float64 eager they agree to 1e-4
  relative to the largest force (measured on the trained default flow: median 5.7e-6,
  worst 7.3e-5; the float32 rounding of the output alone is 6e-8) and to 1e-5 of
  |U| + 1 kJ/mol in energy.
"""
from __future__ import annotations

import pickle
import zipfile

import numpy as np
import pytest
import torch

openmm = pytest.importorskip("openmm")
from openmm import unit  # noqa: E402

from openmm_flowforce.export.compiled import (METADATA_ENTRY, PACKAGE_FORMAT, compile_package,  # noqa: E402
                                              is_package_file, load_package, read_package_metadata)
from openmm_flowforce.export.graph import (HOST_SYNC_OPS, EnergyAndForces, _op_name,  # noqa: E402
                                           export_program, fold_constants, trace_energy_and_forces)
from openmm_flowforce.export.models import CGEnergy, FlowEnergy, energy_module, resolve_exportable  # noqa: E402

from potential_checks import FLOAT32_FORCE_RTOL, FLOAT64_RTOL, assert_close, eager_cg, eager_flow  # noqa: E402


# -- the coordinates decide narrow torsions once ------------------------------------------------------
def test_narrow_torsions_are_an_index_buffer_and_old_state_dicts_load(flow):
    ic = flow.coordinates
    want = torch.nonzero(~ic.torsion_periodic).flatten()
    assert ic.narrow_torsions.dtype == torch.long and torch.equal(ic.narrow_torsions, want)
    state = ic.state_dict()
    assert "narrow_torsions" not in state  # derived, so checkpoints keep their format
    fresh = type(ic)(ic.zmatrix)
    assert fresh.narrow_torsions.numel() == 0  # all torsions start as circles
    fresh.load_state_dict(state)  # an old checkpoint's state dict has exactly these keys
    assert torch.equal(fresh.narrow_torsions, want)
    again = pickle.loads(pickle.dumps(fresh))  # the load hook must not stop pickling
    assert torch.equal(again.narrow_torsions, want)
    x = torch.as_tensor(_pdb_positions(flow))[None]
    u, ladj = ic.to_unit(x)
    u2, ladj2 = fresh.to_unit(x)
    assert torch.equal(u, u2) and torch.equal(ladj, ladj2)


def _pdb_positions(model) -> np.ndarray:
    from openmm_flowforce.export.torchscript import read_pdb_text

    return read_pdb_text(model.topology_pdb)[1]


# -- energy modules: float64 geometry, networks in the export dtype -------------------------------------
def test_energy_modules_equal_the_models_in_float64_and_are_close_in_float32(flow, cg, alanine_md):
    positions = torch.as_tensor(alanine_md["positions"][1300:1304])
    want = flow.energy(positions, 300.0)
    torch.testing.assert_close(FlowEnergy(flow, 300.0, torch.float64)(positions), want, rtol=1e-13, atol=1e-10)
    energy32 = FlowEnergy(flow, 300.0, torch.float32)(positions.float())
    assert energy32.dtype == torch.float32
    torch.testing.assert_close(energy32.double(), want, rtol=1e-5, atol=1e-3)
    net, mapping, _ = cg
    beads = torch.as_tensor(mapping.map_positions(alanine_md["positions"][1300:1304]))
    torch.testing.assert_close(CGEnergy(net, torch.float64)(beads), net(beads), rtol=1e-13, atol=1e-10)
    torch.testing.assert_close(CGEnergy(net, torch.float32)(beads.float()).double(), net(beads), rtol=1e-5,
                               atol=1e-4)


# -- the models' own energy code traces without graph breaks ---------------------------------------------------
def test_energy_code_traces_without_graph_breaks(flow, cg, alanine_md):
    """Narrow torsions are index buffers decided at fit time: TorchDynamo traces the flow's
    energy (and the CG net's) in one graph, and strict export takes it directly."""
    positions = torch.as_tensor(alanine_md["positions"][:2])
    beads = torch.as_tensor(cg[1].map_positions(alanine_md["positions"][:2]))
    for energy, x in ((FlowEnergy(flow, 300.0, torch.float32), positions.float()),
                      (CGEnergy(cg[0], torch.float32), beads.float())):
        explained = torch._dynamo.explain(energy)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        program = torch.export.export(energy, (x,), strict=True)
        torch.testing.assert_close(program.module()(x), energy(x), rtol=1e-6, atol=1e-6)


# -- strict torch.export of the energy+forces graph ----------------------------------------------------------
def _check_graph(gm):
    ops = {_op_name(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert not ops & HOST_SYNC_OPS


def test_strict_export_of_flow_and_cg_energy_and_forces(flow, cg, alanine_md):
    """Both model kinds export with ``torch.export.export(..., strict=True)``; the exported
    programs reproduce the eager float64 models, also away from the tracing example."""
    exports = {}
    for name, model_or_tuple in (("flow", flow), ("cg", cg)):
        exportable = resolve_exportable(model_or_tuple)
        energy = energy_module(exportable, torch.float64)
        example = torch.as_tensor(alanine_md["positions"][0] if name == "flow"
                                  else cg[1].map_positions(alanine_md["positions"][0]))
        gm = trace_energy_and_forces(energy, example, fold=False)
        n_nodes = len(gm.graph.nodes)
        assert fold_constants(gm) > 0 and len(gm.graph.nodes) < n_nodes
        _check_graph(gm)
        program = export_program(gm, example)  # strict=True inside
        assert isinstance(program, torch.export.ExportedProgram)
        exports[name] = program.module()
    for frame in (700, 1499):  # 1499: after the frames the models were fitted to
        positions = alanine_md["positions"][frame]
        energy, forces = exports["flow"](torch.as_tensor(positions))
        assert energy.shape == () and forces.shape == (22, 3) and energy.dtype == torch.float64
        assert_close(energy, forces, *eager_flow(flow, positions), FLOAT64_RTOL)
        beads = cg[1].map_positions(positions)
        energy, forces = exports["cg"](torch.as_tensor(beads))
        assert energy.shape == () and forces.shape == (5, 3)
        assert_close(energy, forces, *eager_cg(cg[0], beads), FLOAT64_RTOL)


def test_batched_graph_has_a_dynamic_batch(cg, alanine_md):
    net, mapping, _ = cg
    energy = CGEnergy(net, torch.float32)
    beads = torch.as_tensor(mapping.map_positions(alanine_md["positions"]), dtype=torch.float32)
    gm = trace_energy_and_forces(energy, beads[:4], batched=True)
    _check_graph(gm)
    program = export_program(gm, beads[:4], batched=True).module()
    for batch in (1, 3, 64):
        x = beads[100:100 + batch]
        got_energy, got_forces = program(x)
        want_energy, want_forces = EnergyAndForces(energy, batched=True)(x)
        assert got_energy.shape == (batch,) and got_forces.shape == (batch, 5, 3)
        torch.testing.assert_close(got_energy, want_energy, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got_forces, want_forces, rtol=1e-4, atol=1e-4 * float(want_forces.abs().max()))


# -- TorchScript path: forces from the module, TorchForce.setOutputsForces(True) ------------------------------
def _reference_context(system):
    integrator = openmm.VerletIntegrator(0.001)
    return openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))


def _system_with(force, masses):
    system = openmm.System()
    for m in masses:
        system.addParticle(m)
    system.addForce(force)
    return system


def _state(context, positions):
    context.setPositions(positions * unit.nanometer)
    state = context.getState(getEnergy=True, getForces=True)
    return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))


@pytest.mark.filterwarnings(r"ignore:.*torch\.jit\.\w+. is deprecated:DeprecationWarning")
def test_torchforce_takes_forces_from_the_module(flow, cg, alanine_md, tmp_path):
    from openmm_flowforce.export.backends import _torchforce_unavailable, make_force
    from openmm_flowforce.export.cg import export_cg_potential

    reason = _torchforce_unavailable()
    if reason is not None:
        pytest.skip(reason)
    force = make_force(flow, backend="torchforce")
    assert force.getOutputsForces()
    context = _reference_context(_system_with(force, [1.0] * 22))
    for frame in (5, 1450):
        positions = alanine_md["positions"][frame]
        assert_close(*_state(context, positions), *eager_flow(flow, positions), 1e-10)
    net, mapping, pdb = cg
    pt = export_cg_potential((net, mapping, pdb), tmp_path / "cg.pt")
    force = make_force(pt, backend="torchforce")
    assert force.getOutputsForces()
    context = _reference_context(_system_with(force, mapping.masses))
    beads = mapping.map_positions(alanine_md["positions"][1450])
    assert_close(*_state(context, beads), *eager_cg(net, beads), 1e-10)


# -- packages without compiling ------------------------------------------------------------------------------
@pytest.mark.filterwarnings(r"ignore:.*torch\.jit\.\w+. is deprecated:DeprecationWarning")
def test_package_metadata_errors_and_bad_options(flow, tmp_path):
    from openmm_flowforce.export.torchscript import export_potential

    pt = export_potential(flow, tmp_path / "model.pt")
    assert not is_package_file(pt)  # same metadata entry name, another format
    with pytest.raises(ValueError, match="torchscript/1"):
        read_package_metadata(pt)
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not an AOTInductor package"):
        read_package_metadata(tmp_path / "junk.pt2")
    with pytest.raises(FileNotFoundError):
        read_package_metadata(tmp_path / "missing.pt2")
    with pytest.raises(ValueError, match=r"\.pt2"):
        compile_package(flow, tmp_path / "model.so")
    with pytest.raises(ValueError, match="valid: float32, float64"):
        compile_package(flow, tmp_path / "model.pt2", dtype="float16")
    with pytest.raises(ValueError, match="valid: cpu, cuda"):
        compile_package(flow, tmp_path / "model.pt2", device="tpu")
    with pytest.raises(ValueError, match="threads must be at least 1"):
        compile_package(flow, tmp_path / "model.pt2", threads=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            compile_package(flow, tmp_path / "model.pt2", device="cuda")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pt2", "model.pt"]  # nothing half-written


def test_cli_compile_options_need_compile(flow, tmp_path, capsys):
    from openmm_flowforce.cli.main import main
    from openmm_flowforce.io import CHECKPOINT_FORMAT, save_checkpoint

    ckpt = tmp_path / "model.ckpt"
    save_checkpoint({"format": CHECKPOINT_FORMAT, "metadata": flow.metadata(), "model": flow.state_dict()}, ckpt)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "m.pt"), "--dtype", "float64"]) == 2
    assert "only apply with --compile" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["export", str(ckpt), "--out", str(tmp_path / "m.pt"), "--compile", "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "needs a CUDA GPU" in err and "Traceback" not in err


# -- compiled packages (AOTInductor: C++ compilation) -----------------------------------------------------------
def test_cg_package_matches_eager_and_finite_differences(cg, cg_package, alanine_md):
    net, mapping, pdb = cg
    meta = read_package_metadata(cg_package)
    assert meta["format"] == PACKAGE_FORMAT and meta["kind"] == "cg_energy_net" and meta["n_atoms"] == 5
    assert meta["dtype"] == "float64" and meta["device"] == "cpu" and meta["temperature"] == 300.0
    assert meta["masses"] == pytest.approx(list(mapping.masses)) and meta["topology_pdb"] == pdb
    assert meta["torch_version"] == torch.__version__ and not meta["batched"]
    assert meta["vectorized"] is True and meta["cpu_threads"] == torch.get_num_threads()
    with zipfile.ZipFile(cg_package) as archive:
        assert f"cg/{METADATA_ENTRY}" in archive.namelist()
    assert is_package_file(cg_package)
    # The bare AOTInductor loader runs the file with no Python-side help.
    runner = torch._inductor.aoti_load_package(str(cg_package))
    beads = mapping.map_positions(alanine_md["positions"][1460])
    energy, forces = runner(torch.as_tensor(beads))
    assert energy.shape == () and forces.shape == (5, 3) and forces.dtype == torch.float64
    assert_close(energy, forces, *eager_cg(net, beads), FLOAT64_RTOL)
    # Directional finite differences of the package's own energy: ΔU along F̂ ≈ −|F|·2h.
    package = load_package(cg_package)
    h = 1e-6  # nm: truncation ~h², rounding ~1e-16·|U|/h
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = beads + rng.normal(scale=0.01, size=beads.shape)
        energy, forces = package(x)
        direction = rng.normal(size=x.shape)
        direction /= np.linalg.norm(direction)
        numeric = (float(package(x + h * direction)[0]) - float(package(x - h * direction)[0])) / (2 * h)
        assert numeric == pytest.approx(-float((forces.numpy() * direction).sum()), rel=1e-6, abs=1e-6)


def test_loaded_package_checks_shapes_and_pickles(cg_package, alanine_md, cg):
    net, mapping, _ = cg
    package = load_package(cg_package)
    with pytest.raises(ValueError, match="positions have 6 atoms, but the package cg.pt2 was compiled for 5"):
        package(np.zeros((6, 3)))
    with pytest.raises(ValueError, match=r"expected positions of shape \(5, 3\)"):
        package(np.zeros((1, 5, 3)))
    beads = mapping.map_positions(alanine_md["positions"][3]).astype(np.float32)  # any float dtype
    energy, forces = package(beads)
    assert energy.dtype == forces.dtype == torch.float64
    again = pickle.loads(pickle.dumps(package))
    torch.testing.assert_close(again(beads)[1], forces, rtol=0, atol=0)


def test_pythonforce_runs_a_package_in_a_context(cg, cg_package, alanine_md):
    from openmm_flowforce.export.backends import make_force, resolve_potential

    net, mapping, _ = cg
    source = resolve_potential(cg_package)
    assert source.package_path == cg_package and source.masses == pytest.approx(list(mapping.masses))
    with pytest.raises(ValueError, match="TorchForce runs TorchScript"):
        make_force(cg_package, backend="torchforce")
    with pytest.raises(ValueError, match="fixed"):
        make_force(cg_package, temperature=350.0)
    force = make_force(cg_package, backend="pythonforce")  # auto prefers the native plugin (test_native_models)
    assert type(force).__name__ == "PythonForce"
    context = _reference_context(_system_with(force, mapping.masses))
    for frame in (10, 1490):
        beads = mapping.map_positions(alanine_md["positions"][frame])
        assert_close(*_state(context, beads), *eager_cg(net, beads), FLOAT64_RTOL)


@pytest.mark.slow
def test_float32_batched_cg_package(cg, alanine_md, tmp_path):
    net, mapping, _ = cg
    path = compile_package(cg, tmp_path / "batched.pt2", batch=True)
    meta = read_package_metadata(path)
    assert meta["batched"] and meta["dtype"] == "float32"
    runner = torch._inductor.aoti_load_package(str(path))
    beads = mapping.map_positions(alanine_md["positions"])
    for batch in (1, 7, 256):
        energy, forces = runner(torch.as_tensor(beads[:batch], dtype=torch.float32))
        assert energy.shape == (batch,) and forces.shape == (batch, 5, 3) and energy.dtype == torch.float32
        want_energy, want_forces = net.energy_and_forces(torch.as_tensor(beads[:batch]))
        scale = float(want_forces.abs().max())
        np.testing.assert_allclose(energy.double().numpy(), want_energy.detach().numpy(), rtol=1e-5, atol=1e-5)
        assert float((forces.double() - want_forces).abs().max()) <= FLOAT32_FORCE_RTOL * scale
    with pytest.raises(ValueError, match="batched package"):
        from openmm_flowforce.export.backends import make_force

        make_force(path, backend="pythonforce")


@pytest.mark.slow
def test_flow_packages_float64_and_float32(flow, alanine_md, tmp_path):
    """The flow compiles (minutes), reproduces eager float64 in float64 and within the stated
    float32 tolerance in float32, and runs in an OpenMM Context through PythonForce."""
    from openmm_flowforce.export.backends import make_force

    path64 = compile_package(flow, tmp_path / "flow64.pt2", temperature=310.0, dtype=torch.float64)
    path32 = compile_package(flow, tmp_path / "flow32.pt2", temperature=310.0)
    meta = read_package_metadata(path32)
    assert meta["kind"] == "boltzmann_generator" and meta["temperature"] == 310.0 and meta["masses"] is None
    assert meta["topology_pdb"] == flow.topology_pdb and meta["n_atoms"] == 22
    run64, run32 = (torch._inductor.aoti_load_package(str(p)) for p in (path64, path32))
    for frame in (0, 1499):
        positions = alanine_md["positions"][frame]
        want = eager_flow(flow, positions, 310.0)
        assert_close(*run64(torch.as_tensor(positions)), *want, FLOAT64_RTOL)
        energy, forces = run32(torch.as_tensor(positions, dtype=torch.float32))
        assert energy.dtype == forces.dtype == torch.float32
        assert abs(float(energy) - want[0]) <= 1e-5 * (abs(want[0]) + 1.0)
        assert np.abs(forces.double().numpy() - want[1]).max() <= FLOAT32_FORCE_RTOL * np.abs(want[1]).max()
    context = _reference_context(_system_with(make_force(path64), [1.0] * 22))
    positions = alanine_md["positions"][1480]
    assert_close(*_state(context, positions), *eager_flow(flow, positions, 310.0), FLOAT64_RTOL)


@pytest.mark.slow
def test_cli_export_compile_writes_the_package_beside(cg, alanine_md, tmp_path, capsys):
    from openmm_flowforce.cli.main import main
    from openmm_flowforce.potentials.cg_net import save_cg_net

    net, mapping, _ = cg
    model = tmp_path / "cg.ckpt"
    save_cg_net(model, net, mapping)
    assert main(["export", str(model), "--out", str(tmp_path / "cg.pt"), "--compile", "--dtype", "float64"]) == 0
    captured = capsys.readouterr()
    assert "compiling" in captured.err and "wrote" in captured.out
    assert read_package_metadata(tmp_path / "cg.pt2")["dtype"] == "float64"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cg.ckpt", "cg.pt", "cg.pt2"]
    # `flowforce simulate` takes the package (auto backend: PythonForce) and the bead masses in it.
    pdb = tmp_path / "cg.pdb"
    pdb.write_text(mapping.pdb_text(mapping.map_positions(alanine_md["positions"][0])))
    dcd = tmp_path / "cg.dcd"
    assert main(["simulate", str(tmp_path / "cg.pt2"), "--topology", str(pdb), "--steps", "40", "--timestep-fs", "2",
                 "--report-interval", "20", "--platform", "Reference", "--out", str(dcd)]) == 0
    assert dcd.stat().st_size > 0

