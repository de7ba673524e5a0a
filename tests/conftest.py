"""Test markers: ``slow`` (opt-in) and ``gpu`` (only where CUDA works in torch and OpenMM)."""
from __future__ import annotations

import functools
import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--runslow",
        action="store_true",
        default=False,
        help="also run tests marked slow (or set FLOWFORCE_RUNSLOW=1)",
    )


def pytest_configure(config: pytest.Config) -> None:
    import torch

    # The tests' tensors are small: one intra-op thread is faster than two on a 2-core
    # machine, and far faster when another process competes for the cores.
    torch.set_num_threads(1)
    config.addinivalue_line("markers", "slow: long test; skipped unless --runslow or FLOWFORCE_RUNSLOW=1")
    config.addinivalue_line(
        "markers", "gpu: needs CUDA in torch and the OpenMM CUDA platform; skipped where either is missing"
    )


@functools.lru_cache(maxsize=1)
def _gpu_missing_reason() -> str | None:
    """Why GPU tests cannot run here, or None when they can."""
    import torch

    if not torch.cuda.is_available():
        return "torch.cuda is not available"
    import openmm

    names = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
    if "CUDA" not in names:
        return f"OpenMM has no CUDA platform (available: {names})"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--runslow") or os.environ.get("FLOWFORCE_RUNSLOW") == "1"
    skip_slow = pytest.mark.skip(reason="slow test: use --runslow or FLOWFORCE_RUNSLOW=1")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        # Only probe torch/OpenMM when a gpu test was collected: keeps collection cheap.
        if "gpu" in item.keywords:
            reason = _gpu_missing_reason()
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=f"gpu test: {reason}"))


@pytest.fixture(scope="session")
def alanine_md():
    """Short Langevin MD of the built-in alanine dipeptide (amber14, vacuum, 300 K).

    Returns a dict with ``topology``, ``positions`` (T, N, 3) nm and ``forces`` (T, N, 3)
    kJ/mol/nm, float64 numpy, T = 1500 frames every 20 fs after minimisation.
    """
    import numpy as np
    import openmm
    from openmm import app, unit

    from openmm_flowforce.data import alanine_dipeptide_pdb

    pdb = app.PDBFile(alanine_dipeptide_pdb())
    system = app.ForceField("amber14-all.xml").createSystem(pdb.topology, nonbondedMethod=app.NoCutoff,
                                                            constraints=None)
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 5.0 / unit.picosecond, 0.001 * unit.picosecond)
    integrator.setRandomNumberSeed(7)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(pdb.positions)
    openmm.LocalEnergyMinimizer.minimize(context)
    context.setVelocitiesToTemperature(300 * unit.kelvin, 7)
    integrator.step(1000)
    positions, forces = [], []
    for _ in range(1500):
        integrator.step(20)
        state = context.getState(getPositions=True, getForces=True)
        positions.append(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
        forces.append(state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))
    return {"topology": pdb.topology, "system": system, "positions": np.array(positions),
            "forces": np.array(forces)}


@pytest.fixture
def float64():
    """Run a test with float64 as torch's default dtype (restored afterwards), seeded."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(autouse=True)
def _default_dtype_float32():
    """Every test starts from torch's own default dtype, whatever an earlier test or
    module fixture left behind."""
    import torch

    torch.set_default_dtype(torch.float32)
    yield


# -- tiny learned potentials shared by the export, compiled-package and native-plugin tests ------------
@pytest.fixture(scope="session")
def flow(alanine_md):
    """A tiny, non-identity flow on alanine dipeptide, fitted to MD (narrow and periodic torsions), float64."""
    import torch

    from openmm_flowforce.potentials import BoltzmannGenerator
    from potential_checks import default_dtype

    torch.manual_seed(0)
    with default_dtype(torch.float64):
        model = BoltzmannGenerator.from_topology(alanine_md["topology"], alanine_md["positions"][:1200], n_layers=2,
                                                 hidden=8, n_components=2, identity_init=False)
    periodic = model.coordinates.torsion_periodic
    assert 0 < int(periodic.sum()) < len(periodic)  # both torsion branches are exercised
    return model.eval()


@pytest.fixture(scope="session")
def cg(alanine_md):
    """``(net, mapping, topology_pdb)``: a 5-bead CG net with every prior and a non-zero MLP, float64."""
    import torch

    from openmm_flowforce.coordinates.cg_mapping import CGMapping
    from openmm_flowforce.potentials.cg_net import CGEnergyNet

    mapping = CGMapping.from_topology(alanine_md["topology"], "backbone")
    beads = mapping.map_positions(alanine_md["positions"])
    torch.manual_seed(0)
    net = CGEnergyNet.from_data(mapping, beads[:1200], 300.0, hidden=(8, 8),
                                priors={"bonds": {}, "angles": {}, "repulsion": {}, "dihedrals": {"n_terms": 2}})
    net = net.double()
    torch.nn.init.normal_(net.network[-1].weight, std=0.5)
    return net.eval(), mapping, mapping.pdb_text(beads[0])


@pytest.fixture(scope="session")
def cg_package(cg, tmp_path_factory):
    """The float64 AOTInductor package of :func:`cg` (compiled once per session: about a minute)."""
    import torch

    from openmm_flowforce.export.compiled import compile_package

    return compile_package(cg, tmp_path_factory.mktemp("cg") / "cg.pt2", dtype=torch.float64)
