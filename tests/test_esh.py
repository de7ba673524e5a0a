"""ESH dynamics (arXiv 2111.02434): the torch kernels, the sampler method and the OpenMM
CustomIntegrator, checked against exact solutions, analytic variances, the DW-4 reference
set and each other."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import openmm
import pytest
import torch
from openmm import unit

from openmm_flowforce.conventions import kT
from openmm_flowforce.errors import FlowforceError
from openmm_flowforce.md.esh import ESHIntegrator, ESHWeightsReporter, check_esh_system
from openmm_flowforce.samplers import get_method
from openmm_flowforce.samplers.common import load_sampler, make_target
from openmm_flowforce.samplers.esh import (ESHState, energy_and_force, esh_half_step, esh_hamiltonian, esh_run,
                                           pooled_log_weights, random_direction)
from openmm_flowforce.targets.toys import pairwise_distances

SHARED_DATA = Path(os.environ.get("FLOWFORCE_SHARED_DATA")
                   or Path(__file__).resolve().parent.parent.parent / "shared" / "data")
F64 = torch.float64
TEMPERATURE = 300.0
#: Spring constants (kJ/mol/nm²) of the anisotropic harmonic wells, per axis.
SPRINGS = (100.0, 400.0, 50.0)


# -- the closed-form step ------------------------------------------------------------------------
def test_half_step_solves_the_scaled_time_ode():
    """The closed form equals an RK4 solution of dû/dτ = (I − ûûᵀ)g/d, dr/dτ = û·g/d for a
    constant g, including a direction against the force and a large δ."""
    gen = torch.Generator().manual_seed(1)
    d = 5
    g = torch.randn(3, d, generator=gen, dtype=F64) * torch.tensor([[1.0], [10.0], [0.1]], dtype=F64)
    u = random_direction((3, d), gen, F64)
    u[1] = -g[1] / g[1].norm() * 0.8 + 0.6 * u[1] / u[1].norm()  # mostly uphill
    u = u / u.norm(dim=-1, keepdim=True)
    r = torch.zeros(3, dtype=F64)
    eps = 0.7
    u_exact, r_exact = esh_half_step(u, r, g, eps, d)

    gn = g.numpy()

    def rhs(state):  # numpy: 8000 small evaluations cost less than in torch
        uu = state[:, :d]
        gu = (gn * uu).sum(-1, keepdims=True)
        return np.concatenate([(gn - gu * uu) / d, gu / d], axis=-1)

    y = np.concatenate([u.numpy(), r.numpy()[:, None]], axis=-1)
    n = 1000
    h = eps / n
    for _ in range(n):
        k1 = rhs(y)
        k2 = rhs(y + 0.5 * h * k1)
        k3 = rhs(y + 0.5 * h * k2)
        k4 = rhs(y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    np.testing.assert_allclose(u_exact.numpy(), y[:, :d], rtol=0, atol=1e-9)
    np.testing.assert_allclose(r_exact.numpy(), y[:, d], rtol=0, atol=1e-9)
    # No force: nothing changes (and nothing is divided by zero).
    u0, r0 = esh_half_step(u, r, torch.zeros_like(g), eps, d)
    np.testing.assert_allclose(u0.numpy(), u.numpy(), rtol=0, atol=1e-15)
    assert torch.equal(r0, r)
    # A huge force: still finite (only e^{−δ} is ever evaluated).
    u_big, r_big = esh_half_step(u, r, 1e6 * g, eps, d)
    assert torch.isfinite(u_big).all() and torch.isfinite(r_big).all()


def _harmonic_torch(springs=SPRINGS, n_particles=1, temperature=TEMPERATURE):
    k = torch.tensor(springs, dtype=F64).repeat(n_particles)
    kt = kT(temperature)
    return (lambda x: 0.5 * (k * x * x).sum(-1) / kt), k, kt


def test_torch_leapfrog_conserves_the_esh_hamiltonian_to_second_order():
    energy, _, _ = _harmonic_torch()
    evaluate = energy_and_force(energy)
    gen = torch.Generator().manual_seed(0)
    start = ESHState.start(0.1 * torch.randn(16, 3, generator=gen, dtype=F64), random_direction((16, 3), gen, F64),
                           evaluate)
    h0 = esh_hamiltonian(start, 3)
    errors = []
    for eps in (0.004, 0.002):
        end = esh_run(start, evaluate, eps, 3, round(0.4 / eps))
        errors.append(float((esh_hamiltonian(end, 3) - h0).abs().max()))
    assert errors[0] < 0.05
    assert 3.0 < errors[0] / errors[1] < 5.0, errors  # O(ε²): halving ε quarters the error


def test_torch_chains_sample_the_harmonic_variance_only_with_weights():
    """3-D anisotropic well, 64 chains with refreshment: the e^r-weighted variance is kT/k per
    axis within 4 standard errors (chains are independent; SE from their spread, ≈ 1–2%);
    unweighted states are hotter by d/(d − 1) = 3/2, as the scaled-time clock predicts."""
    energy, k, kt = _harmonic_torch()
    evaluate = energy_and_force(energy)
    gen = torch.Generator().manual_seed(3)
    sigma = torch.sqrt(kt / k)
    state = ESHState.start(sigma * torch.randn(64, 3, generator=gen, dtype=F64), random_direction((64, 3), gen, F64),
                           evaluate)
    xs, rs = [], []

    def record(step, s):
        if step >= 200 and step % 2 == 0:
            xs.append(s.x / sigma)
            rs.append(s.r)

    esh_run(state, evaluate, 0.4 * float(sigma.min()), 3, 2200, refresh_every=20, generator=gen, record=record)
    x, r = torch.stack(xs), torch.stack(rs)  # (T, B, 3), (T, B)
    w = torch.softmax(r, dim=0)[..., None]
    per_chain = (w * x * x).sum(0) - (w * x).sum(0) ** 2  # (B, 3), in units of kT/k
    estimate = per_chain.mean(0)
    se = per_chain.std(0) / math.sqrt(per_chain.shape[0])
    assert (se < 0.03).all(), se
    assert ((estimate - 1.0).abs() < 4 * se).all(), (estimate, se)
    unweighted = x.reshape(-1, 3).var(0)
    assert ((unweighted - 1.5).abs() < 0.12).all(), unweighted


# -- OpenMM --------------------------------------------------------------------------------------
def _harmonic_system(n_particles: int, quartic: float = 0.0) -> openmm.System:
    force = openmm.CustomExternalForce("0.5*kx*x^2 + 0.5*ky*y^2 + 0.5*kz*z^2 + a*x^4")
    for name, value in zip(("kx", "ky", "kz", "a"), SPRINGS + (quartic,)):
        force.addGlobalParameter(name, value)
    system = openmm.System()
    for i in range(n_particles):
        system.addParticle(1.0 + i)  # masses do not enter ESH (only mass > 0 matters)
        force.addParticle(i, [])
    system.addForce(force)
    return system


def _context(system, integrator, x0, u0=None):
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(x0)
    if u0 is not None:
        context.setVelocities(u0)
    return context


def test_openmm_integrator_conserves_the_esh_hamiltonian():
    """Potential + the reported (ESH) kinetic energy is kT·H: conserved to O(ε²)."""
    system = _harmonic_system(2)
    rng = np.random.default_rng(0)
    x0, u0 = rng.normal(size=(2, 3)) * 0.1, rng.normal(size=(2, 3))
    errors = []
    for eps in (0.02, 0.01):
        integrator = ESHIntegrator(eps, TEMPERATURE)
        context = _context(system, integrator, x0, u0)
        totals = []
        for _ in range(round(1.0 / eps)):
            integrator.step(1)
            state = context.getState(getEnergy=True)
            total = (state.getPotentialEnergy() + state.getKineticEnergy()).value_in_unit(unit.kilojoule_per_mole)
            totals.append(total / kT(TEMPERATURE))
            assert integrator.hamiltonian(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)) == \
                pytest.approx(totals[-1], abs=1e-9)
        errors.append(max(abs(t - totals[0]) for t in totals))
    assert integrator.getGlobalVariableByName("ndof") == 6
    assert errors[0] < 0.05
    assert 3.0 < errors[0] / errors[1] < 5.0, errors


def test_openmm_and_torch_give_the_same_trajectory():
    """Same start, no refreshment: positions and log speed agree after 300 steps (float64)."""
    n = 3
    system = _harmonic_system(n, quartic=30.0)
    rng = np.random.default_rng(1)
    x0 = rng.normal(size=(n, 3)) * 0.1
    u0 = rng.normal(size=(n, 3))
    u0 /= np.linalg.norm(u0)
    integrator = ESHIntegrator(0.02, TEMPERATURE)
    context = _context(system, integrator, x0, u0)
    integrator.step(300)
    state = context.getState(getPositions=True, getVelocities=True)

    k = torch.tensor(SPRINGS, dtype=F64)
    kt = kT(TEMPERATURE)

    def energy(x):
        p = x.reshape(-1, n, 3)
        return ((0.5 * k * p * p).sum((-1, -2)) + 30.0 * (p[..., 0] ** 4).sum(-1)) / kt

    evaluate = energy_and_force(energy)
    end = esh_run(ESHState.start(torch.tensor(x0).reshape(1, -1), torch.tensor(u0).reshape(1, -1), evaluate),
                  evaluate, 0.02, 3 * n, 300)
    np.testing.assert_allclose(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer),
                               end.x.reshape(n, 3).numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(state.getVelocities(asNumpy=True)._value, end.u.reshape(n, 3).numpy(), rtol=0,
                               atol=1e-9)
    assert integrator.log_weight() == pytest.approx(float(end.r), abs=1e-9)
    assert abs(float(end.x.abs().max()) - float(torch.tensor(x0).abs().max())) > 1e-3  # it moved


def test_openmm_integrator_samples_the_harmonic_variance_with_weights(tmp_path):
    """Two particles in a 3-D anisotropic well (d = 6) in a real Context, refreshment every 10
    steps: the e^r-weighted variance per axis is kT/k within 4 batch-means standard errors;
    unweighted frames are hotter by d/(d − 1) = 1.2. The weights come from the reporter file."""
    from openmm import app

    system = _harmonic_system(2)
    integrator = ESHIntegrator(0.03, TEMPERATURE, refresh_every=10)
    integrator.setRandomNumberSeed(7)
    topology = app.Topology()
    chain = topology.addChain()
    for _ in range(2):
        topology.addAtom("Ar", app.Element.getBySymbol("Ar"), topology.addResidue("AR", chain))
    simulation = app.Simulation(topology, system, integrator, openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions(np.zeros((2, 3)) + 0.01)
    weights_csv = tmp_path / "w.csv"
    reporter = ESHWeightsReporter(str(weights_csv), 10)
    simulation.step(300)  # burn-in
    positions = []

    class Positions:
        def describeNextReport(self, sim):  # noqa: N802
            return {"steps": 10 - sim.currentStep % 10, "periodic": False, "include": ["positions"]}

        def report(self, sim, state):
            positions.append(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))

    simulation.reporters.extend([Positions(), reporter])
    simulation.step(50000)
    reporter.close()
    table = np.loadtxt(weights_csv, delimiter=",", skiprows=1)
    assert table.shape == (len(positions), 3)
    x = np.asarray(positions) / np.sqrt(kT(TEMPERATURE) / np.asarray(SPRINGS))  # (T, 2, 3) in units of sigma
    log_w = table[:, 1]
    blocks = []
    for idx in np.array_split(np.arange(len(x)), 10):
        w = np.exp(log_w[idx] - log_w[idx].max())
        w /= w.sum()
        blocks.append(np.einsum("t,tpk->k", w, x[idx] ** 2) / 2)
    blocks = np.asarray(blocks)
    estimate, se = blocks.mean(0), blocks.std(0, ddof=1) / np.sqrt(len(blocks))
    assert (se < 0.04).all(), se
    assert (np.abs(estimate - 1.0) < 4 * se).all(), (estimate, se)
    unweighted = (x ** 2).mean((0, 1))
    assert (np.abs(unweighted - 1.2) < 0.1).all(), unweighted
    assert np.ptp(table[:, 2]) < 0.5  # H stays near its start (the reporter's second column)


def test_openmm_integrator_runs_a_force_field_system():
    """Alanine dipeptide, amber14 in vacuum (no constraints, no CMMotionRemover), Reference:
    over 500 steps of 0.004 nm with refreshment, H (reduced) stays within 0.5 of its start
    (measured: 0.15), and d counts all 66 coordinates."""
    from openmm import app

    from openmm_flowforce.data import alanine_dipeptide_pdb

    pdb = app.PDBFile(alanine_dipeptide_pdb())
    system = app.ForceField("amber14-all.xml").createSystem(pdb.topology, nonbondedMethod=app.NoCutoff,
                                                            constraints=None, removeCMMotion=False)
    check_esh_system(system)
    integrator = ESHIntegrator(0.004, TEMPERATURE, refresh_every=50)
    integrator.setRandomNumberSeed(3)
    context = _context(system, integrator, pdb.positions)
    openmm.LocalEnergyMinimizer.minimize(context, maxIterations=50)
    hamiltonians = []
    for _ in range(50):
        integrator.step(10)
        energy = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        hamiltonians.append(integrator.hamiltonian(energy))
    assert integrator.getGlobalVariableByName("ndof") == 66
    assert np.isfinite(hamiltonians).all() and np.ptp(hamiltonians) < 0.5


def test_esh_refuses_systems_it_cannot_run():
    system = _harmonic_system(2)
    system.addConstraint(0, 1, 0.1)
    with pytest.raises(FlowforceError, match="constraints"):
        check_esh_system(system)
    system = _harmonic_system(2)
    system.addForce(openmm.CMMotionRemover())
    with pytest.raises(FlowforceError, match="CMMotionRemover"):
        check_esh_system(system)
    check_esh_system(_harmonic_system(2))
    with pytest.raises(FlowforceError, match="step_size"):
        ESHIntegrator(0.0, TEMPERATURE)
    with pytest.raises(FlowforceError, match="refresh_every"):
        ESHIntegrator(0.01, TEMPERATURE, refresh_every=-1)


# -- the sampler method --------------------------------------------------------------------------
def test_pooled_log_weights_normalise_per_chain():
    r = torch.tensor([[0.0, 5.0], [math.log(3.0), 5.0]], dtype=F64)
    w = pooled_log_weights(r).exp()
    np.testing.assert_allclose(w.numpy(), [[0.125, 0.25], [0.375, 0.25]], rtol=1e-14)


@pytest.mark.slow  # ≈ 3 s alone, 8 s on a busy machine
def test_dw4_distance_marginal_matches_the_reference_set(tmp_path):
    """64 ESH chains × 2000 steps on DW-4 (via the registry and the engine): the weighted
    interparticle-distance marginal agrees with the shared reference set. Tolerances: the
    mean distance and the mass beyond the barrier (d > 4.5) within 4 standard errors of
    the chain-to-chain spread plus 0.01 (the reference set is itself slightly
    under-equilibrated, see its README); the 20-bin histograms within 0.05 in total
    variation."""
    path = SHARED_DATA / "dw4" / "test.npy"
    if not path.is_file():
        pytest.skip(f"shared reference data not found at {path}")
    reference = pairwise_distances(torch.from_numpy(np.load(path)).to(F64), 4, 2).reshape(-1)
    method = get_method("esh")
    target = make_target("dw4")
    options = method.options({"steps": 2000, "n_chains": 64, "seed": 0})
    model = method.build(target, options)
    summary = method.train(model, target, options, tmp_path / "dw4.ckpt", progress=False)
    assert summary["energy_evaluations"] == 64 * 2001
    n = int(model.n_recorded)
    x = model.samples[:n]  # (T, B, 8)
    w = torch.softmax(model.log_speeds[:n], dim=0)  # per chain
    d = pairwise_distances(x.reshape(-1, 8), 4, 2).reshape(n, 64, 6)
    for stat, ref in ((d, reference.mean()), ((d > 4.5).to(F64), (reference > 4.5).to(F64).mean())):
        per_chain = (w[..., None] * stat).sum(0).mean(-1)
        se = per_chain.std() / math.sqrt(64)
        assert abs(float(per_chain.mean() - ref)) < 4 * float(se) + 0.01, (float(per_chain.mean()), float(ref), se)
    xs, log_w = model.weighted_samples()
    edges = torch.linspace(0.0, 8.0, 21, dtype=F64)
    ours = torch.histogram(pairwise_distances(xs, 4, 2).reshape(-1), edges,
                           weight=log_w.exp().repeat_interleave(6))[0]
    theirs = torch.histogram(reference, edges)[0]
    tv = 0.5 * float((ours / ours.sum() - theirs / theirs.sum()).abs().sum())
    assert tv < 0.05, tv


def test_esh_run_resumes_exactly(tmp_path):
    """60 steps, then resumed to 120, records the same states as 120 steps at once (and the
    refreshment draws continue from the saved generator)."""
    method, target = get_method("esh"), make_target("gmm40")
    opts = {"n_chains": 4, "burn_in": 10, "thin": 3, "refresh_every": 7, "seed": 2}
    whole = method.build(target, method.options({**opts, "steps": 120}))
    method.train(whole, target, method.options({**opts, "steps": 120}), tmp_path / "a.ckpt", progress=False)
    part = method.build(target, method.options({**opts, "steps": 60}))
    method.train(part, target, method.options({**opts, "steps": 60}), tmp_path / "b.ckpt", progress=False)
    part = method.build(target, method.options({**opts, "steps": 120}))
    summary = method.train(part, target, method.options({**opts, "steps": 120}), tmp_path / "b.ckpt", progress=False)
    assert summary["resumed_from"] == 60
    assert int(whole.n_recorded) == int(part.n_recorded) == 110 // 3
    assert torch.equal(whole.samples, part.samples) and torch.equal(whole.log_speeds, part.log_speeds)
    loaded = load_sampler(tmp_path / "b.ckpt")  # a sampler checkpoint like any other method's
    assert torch.equal(loaded.model.samples, whole.samples)
    assert loaded.method.sample(loaded.model, 10, torch.Generator().manual_seed(0)).shape == (10, 2)


def test_esh_needs_starting_positions_for_openmm_targets():
    from openmm_flowforce.targets.openmm_energy import OpenMMEnergy

    target = OpenMMEnergy(_harmonic_system(2), TEMPERATURE)
    method = get_method("esh")
    options = method.options({"steps": 50, "n_chains": 2, "burn_in": 0, "step_size": 0.01})
    model = method.build(target, options)
    with pytest.raises(FlowforceError, match="start_from"):
        method.train(model, target, options, None, progress=False)
    model.start_from(np.full((2, 3), 0.02))
    method.train(model, target, options, None, progress=False)
    x, log_w = model.weighted_samples()
    assert x.shape == (2 * 10, 6) and torch.isfinite(log_w).all()
    assert float(torch.logsumexp(log_w, 0)) == pytest.approx(0.0, abs=1e-12)


# -- flowforce simulate --integrator esh -----------------------------------------------------------
@pytest.mark.slow  # ≈ 10 s: exporting and loading the TorchScript potential dominates
def test_cli_simulate_with_esh_writes_weights_per_frame(alanine_md, tmp_path, capsys):
    """A tiny exported flow potential of alanine dipeptide under ``--integrator esh``: one
    weight row per DCD frame, the ESH energy conserved along the run, no temperature column."""
    import mdtraj
    from openmm import app

    from openmm_flowforce.cli import simulate as cli_simulate
    from openmm_flowforce.cli.main import main
    from openmm_flowforce.export.torchscript import export_potential
    from openmm_flowforce.md.simulate import INTEGRATORS
    from openmm_flowforce.potentials import BoltzmannGenerator

    assert cli_simulate.INTEGRATORS == INTEGRATORS
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        torch.manual_seed(0)
        model = BoltzmannGenerator.from_topology(alanine_md["topology"], alanine_md["positions"][:600], n_layers=2,
                                                 hidden=8, n_components=2).eval()
        pt = export_potential(model, tmp_path / "ala.pt", temperature=300.0)
    finally:
        torch.set_default_dtype(old)
    top = tmp_path / "top.pdb"
    with open(top, "w") as handle:
        app.PDBFile.writeFile(alanine_md["topology"], alanine_md["positions"][0] * unit.nanometer, handle)
    out, log = tmp_path / "traj.dcd", tmp_path / "log.csv"
    assert main(["simulate", str(pt), "--topology", str(top), "--steps", "60", "--report-interval", "20",
                 "--platform", "Reference", "--integrator", "esh", "--esh-step", "0.002", "--esh-refresh", "25",
                 "--out", str(out), "--report", str(log)]) == 0
    assert "ESH frames need weights" in capsys.readouterr().out
    traj = mdtraj.load(str(out), top=str(top))
    table = np.loadtxt(tmp_path / "traj.esh_weights.csv", delimiter=",", skiprows=1)
    assert traj.n_frames == 3 and table.shape == (3, 3) and list(table[:, 0]) == [20, 40, 60]
    assert np.isfinite(table).all() and np.ptp(table[:, 2]) < 0.5  # H (reduced) barely moves
    assert "Temperature" not in log.read_text().splitlines()[0]


def test_esh_options_are_checked():
    from openmm_flowforce.errors import OptionError

    method = get_method("esh")
    for bad, match in (({"n_chains": 0}, "n_chains"), ({"refresh_every": -1}, "refresh_every"),
                       ({"step": 0.1}, "unknown option"), ({"step_size": -1.0}, "step_size")):
        with pytest.raises(OptionError, match=match):
            method.options(bad)
