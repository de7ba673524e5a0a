"""CGSchNet (priors + SchNet message passing): physics checks, bead types, model files, export to
OpenMM, a short force-matching fit, and the ``flowforce cg --net`` option."""
from __future__ import annotations

import math

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from openmm_flowforce.coordinates.cg_mapping import BEAD_TYPES, CGMapping, bead_type
from openmm_flowforce.potentials.cg_net import CGEnergyNet, cg_metadata, cg_net_class, load_cg_net, \
    net_from_metadata, save_cg_net
from openmm_flowforce.potentials.schnet import CGSchNet, cosine_cutoff
from potential_checks import assert_close, eager_cg

CHIGNOLIN = ("GLY", "TYR", "ASP", "PRO", "GLU", "THR", "GLY", "THR", "TRP", "GLY")


def chignolin_backbone_topology() -> app.Topology:
    """An openmm Topology of chignolin's backbone (N, CA, C of GYDPETGTWG), bonded along the chain."""
    top = app.Topology()
    chain = top.addChain("A")
    previous = None
    for k, name in enumerate(CHIGNOLIN):
        residue = top.addResidue(name, chain, str(k + 1))
        atoms = [top.addAtom(atom, app.Element.getBySymbol(atom[0]), residue) for atom in ("N", "CA", "C")]
        top.addBond(atoms[0], atoms[1])
        top.addBond(atoms[1], atoms[2])
        if previous is not None:
            top.addBond(previous, atoms[0])
        previous = atoms[2]
    return top


def hairpin(n: int = 10) -> np.ndarray:
    """A β-hairpin-like Cα chain ``(n, 3)`` nm: two strands 0.5 nm apart, zig-zag out of plane."""
    half = n // 2
    x = [(0.35 * k, 0.0) for k in range(half)] + [(0.35 * (half - 1 - k), 0.5) for k in range(n - half)]
    return np.array([(a, b, 0.1 * (-1) ** k) for k, (a, b) in enumerate(x)])


@pytest.fixture(scope="module")
def chignolin():
    """``(mapping, frames (400, 10, 3) nm, forces (400, 10, 3) kJ/mol/nm)``: Cα mapping of the chignolin
    backbone topology; frames scattered around a hairpin; forces of a known toy energy (stiff bonds and a
    Gaussian contact between beads 1 and 8) plus noise, like mapped all-atom forces."""
    mapping = CGMapping.from_topology(chignolin_backbone_topology(), "ca")
    rng = np.random.default_rng(0)
    frames = torch.as_tensor(hairpin()[None] + 0.03 * rng.standard_normal((400, 10, 3))).requires_grad_(True)
    bonds = torch.linalg.vector_norm(frames[:, 1:] - frames[:, :-1], dim=-1)
    contact = torch.linalg.vector_norm(frames[:, 1] - frames[:, 8], dim=-1)
    energy = (500.0 * (bonds - 0.38) ** 2).sum(-1) - 20.0 * torch.exp(-((contact - 0.5) / 0.1) ** 2)
    (gradient,) = torch.autograd.grad(energy.sum(), frames)
    forces = -gradient.numpy() + 20.0 * rng.standard_normal((400, 10, 3))
    return mapping, frames.detach().numpy(), forces


def make_net(mapping, frames, readout_std: float = 0.3, seed: int = 0, **options) -> CGSchNet:
    """A tiny float64 CGSchNet with fitted priors and a non-zero readout (an untrained one adds nothing)."""
    torch.manual_seed(seed)
    options = {"hidden": 8, "interactions": 2, "n_rbf": 8, "cutoff_nm": 1.0, **options}
    net = CGSchNet.from_data(mapping, frames, 300.0, **options).double()
    torch.nn.init.normal_(net.network.readout[-1].weight, std=readout_std)
    return net.eval()


# -- bead types ----------------------------------------------------------------------------------------
def test_bead_types_from_residue_names_and_backbone_kinds(chignolin):
    from openmm_flowforce.data import alanine_dipeptide_pdb

    alanine = app.PDBFile(alanine_dipeptide_pdb()).topology
    mapping = chignolin[0]
    assert mapping.types == list(CHIGNOLIN)
    assert mapping.type_indices == [BEAD_TYPES.index(name) for name in CHIGNOLIN]
    backbone = CGMapping.from_topology(alanine, "backbone")  # ACE:C ALA:N ALA:CA ALA:C NME:N
    assert backbone.types == ["C", "N", "ALA", "C", "N"]
    assert CGMapping.from_topology(alanine, "residue-com").types == ["CAP", "ALA", "CAP"]
    assert (bead_type("CA", "HIE"), bead_type("CA", "CYX"), bead_type("XCM", "HOH")) == ("HIS", "CYS", "X")


def test_bead_types_survive_to_dict_and_old_dicts_still_load(chignolin):
    mapping = chignolin[0]
    data = mapping.to_dict()
    assert CGMapping.from_dict(data).types == mapping.types
    old = {k: v for k, v in data.items() if k != "types"}  # written before bead types existed
    assert CGMapping.from_dict(old).types == mapping.types
    data["types"] = ["GLY"] * 9 + ["FOO"]
    with pytest.raises(ValueError, match="FOO"):
        CGMapping.from_dict(data)


# -- physics ---------------------------------------------------------------------------------------------
def test_energy_is_invariant_and_forces_equivariant_under_rigid_motions(chignolin):
    mapping, frames, _ = chignolin
    net = make_net(mapping, frames)
    x = torch.as_tensor(frames[:8])
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    for rotation in (q, -q):  # a rotation and a rotoreflection (distances only: both hold)
        moved = x @ rotation.T + torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
        energy, forces = net.energy_and_forces(x)
        energy_moved, forces_moved = net.energy_and_forces(moved)
        assert energy.std() > 1.0  # the frames differ, so the check can fail
        torch.testing.assert_close(energy_moved, energy, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(forces_moved, forces @ rotation.T, rtol=1e-10, atol=1e-9)


def test_network_energy_is_invariant_under_permutations_of_beads_of_one_type(chignolin):
    """Beads 0, 6 and 9 are GLY, 5 and 7 THR: swapping positions within a type leaves the SchNet energy
    unchanged (the priors have per-bond parameters, so only bond-graph automorphisms that also map the
    fitted parameters keep the total energy: not tested). Swapping GLY with TYR changes it."""
    mapping, frames, _ = chignolin
    net = make_net(mapping, frames)
    x = torch.as_tensor(frames[:4])

    def learned(positions):
        return net.network(net.features(positions)).squeeze(-1)

    permutation = list(range(10))
    permutation[0], permutation[6], permutation[9], permutation[5], permutation[7] = 6, 9, 0, 7, 5
    torch.testing.assert_close(learned(x[:, permutation]), learned(x), rtol=1e-12, atol=1e-12)
    swap_types = list(range(10))
    swap_types[0], swap_types[1] = 1, 0
    assert (learned(x[:, swap_types]) - learned(x)).abs().min() > 1e-6


def test_forces_match_finite_differences_and_gradcheck(chignolin):
    mapping, frames, _ = chignolin
    net = make_net(mapping, frames)
    x = torch.as_tensor(frames[:3])
    energy, forces = net.energy_and_forces(x)
    direction = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    h = 1e-5
    central = (net(x + h * direction) - net(x - h * direction)) / (2 * h)
    torch.testing.assert_close(central, -(forces * direction).sum((1, 2)), rtol=1e-7, atol=1e-6)
    small = make_net(mapping, frames, hidden=4, interactions=1, n_rbf=4)
    y = torch.as_tensor(frames[:1]).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(small, (y,))
    assert torch.autograd.gradgradcheck(small, (y,))  # force matching differentiates the forces


def test_energy_and_forces_are_continuous_where_a_pair_crosses_the_cutoff():
    """Two beads, no priors: E(d) is the SchNet energy of one pair. As d crosses r_c, E and F are
    continuous (f_c and f_c' vanish at r_c); beyond r_c the pair contributes nothing."""
    cutoff = 0.8
    torch.manual_seed(3)
    net = CGSchNet(2, [], bead_types=[0, 1], hidden=8, interactions=2, n_rbf=8, cutoff_nm=cutoff, priors=[]).double()
    torch.nn.init.normal_(net.network.readout[-1].weight, std=1.0)
    d = torch.tensor([0.3, 0.5, cutoff - 1e-4, cutoff - 1e-7, cutoff + 1e-7, cutoff + 1e-4, 1.5], dtype=torch.float64)
    x = torch.zeros(len(d), 2, 3, dtype=torch.float64)
    x[:, 1, 0] = d
    energy, forces = (t.detach() for t in net.energy_and_forces(x))
    far = energy[-1]  # the beads' energies without any interaction
    force_scale = float(forces[:2].abs().max())
    assert abs(float(energy[0] - far)) > 1e-3 and force_scale > 1e-2  # the pair interacts inside r_c
    assert abs(float(energy[3] - energy[4])) < 1e-9 and abs(float(energy[2] - far)) < 1e-6
    assert float(forces[3].abs().max()) < 1e-5 * force_scale and float(forces[2].abs().max()) < 1e-2 * force_scale
    assert float(forces[4:].abs().max()) == 0.0 and float((energy[4:] - far).abs().max()) < 1e-12
    assert float(cosine_cutoff(torch.tensor(cutoff), cutoff)) == 0.0


# -- model files, registry ---------------------------------------------------------------------------------
def test_model_file_round_trip_and_registry(chignolin, tmp_path):
    mapping, frames, _ = chignolin
    net = make_net(mapping, frames)
    save_cg_net(tmp_path / "schnet.ckpt", net, mapping)
    loaded, stored = load_cg_net(tmp_path / "schnet.ckpt")
    assert isinstance(loaded, CGSchNet) and stored.types == mapping.types
    assert loaded.config() == net.config() and loaded.config()["bead_types"] == mapping.type_indices
    x = torch.as_tensor(frames[:4])
    torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
    mlp = CGEnergyNet(3, [(0, 1), (1, 2)], hidden=(4,))
    assert "net" not in mlp.config()  # MLP configs are what older versions wrote and read
    assert type(net_from_metadata(cg_metadata(mlp))) is CGEnergyNet
    with pytest.raises(ValueError, match="unknown CG net 'gnn'; valid: mlp, schnet"):
        cg_net_class("gnn")
    with pytest.raises(ValueError, match="cutoff_nm"):
        CGSchNet(3, [(0, 1)], cutoff_nm=-1.0)


# -- OpenMM ------------------------------------------------------------------------------------------------
def test_torchscript_export_through_torchforce_matches_eager(chignolin, tmp_path):
    pytest.importorskip("openmmtorch")
    from openmm_flowforce.export.backends import make_force
    from openmm_flowforce.export.torchscript import export_potential, read_export_metadata

    mapping, frames, _ = chignolin
    net = make_net(mapping, frames)
    pt = export_potential((net, mapping, mapping.pdb_text(frames[0])), tmp_path / "schnet.pt")
    assert read_export_metadata(pt)["kind"] == "cg_energy_net"
    system = openmm.System()
    for mass in mapping.masses:
        system.addParticle(mass)
    system.addForce(make_force(pt, backend="torchforce"))
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    for frame in frames[:3]:
        context.setPositions(frame * unit.nanometer)
        state = context.getState(getEnergy=True, getForces=True)
        assert_close(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
                     state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer),
                     *eager_cg(net, frame), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_strict_torch_export_with_a_dynamic_batch_matches_eager(chignolin, dtype):
    """No data-dependent control flow: ``torch.export(strict=True)`` takes the energy+forces graph with a
    symbolic batch size, and a batch of another size gives the eager energies and forces."""
    from openmm_flowforce.export.graph import check_against_eager, export_program, trace_energy_and_forces
    from openmm_flowforce.export.models import CGEnergy

    mapping, frames, _ = chignolin
    net = make_net(mapping, frames)
    x = torch.as_tensor(frames[:4], dtype=dtype)
    program = export_program(trace_energy_and_forces(CGEnergy(net, dtype).eval(), x, batched=True), x, batched=True)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    check_against_eager(program.module(), CGEnergy(net, torch.float64), torch.as_tensor(frames[:7], dtype=dtype), rtol)


@pytest.fixture(scope="module")
def schnet_package(chignolin, tmp_path_factory):
    """The float32 AOTInductor package of :func:`make_net` (about a minute to compile)."""
    from openmm_flowforce.export.compiled import compile_package

    mapping, frames, _ = chignolin
    return compile_package((make_net(mapping, frames), mapping, mapping.pdb_text(frames[0])),
                           tmp_path_factory.mktemp("schnet") / "schnet.pt2")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pythonforce", "native"])
def test_compiled_package_backends_match_eager(chignolin, schnet_package, backend):
    from openmm_flowforce.export.backends import make_force
    from potential_checks import FLOAT32_FORCE_RTOL, require_native_plugin

    if backend == "native":
        require_native_plugin()
    mapping, frames, _ = chignolin
    net = make_net(mapping, frames)  # the same seed: the packaged net
    package = schnet_package
    system = openmm.System()
    for mass in mapping.masses:
        system.addParticle(mass)
    system.addForce(make_force(package, backend=backend))
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    for frame in frames[:3]:
        context.setPositions(frame * unit.nanometer)
        state = context.getState(getEnergy=True, getForces=True)
        assert_close(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
                     state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer),
                     *eager_cg(net, frame), rtol=FLOAT32_FORCE_RTOL)


# -- training ------------------------------------------------------------------------------------------------
def test_force_matching_fit_on_chignolin_like_data_lowers_the_loss(chignolin):
    from openmm_flowforce.training.cg import train_cg_net
    from openmm_flowforce.training.trainer import TrainConfig

    mapping, frames, forces = chignolin
    torch.manual_seed(0)
    net = CGSchNet.from_data(mapping, frames[:360], 300.0, hidden=16, interactions=2, n_rbf=16).double()
    result = train_cg_net(net, frames, forces, TrainConfig(steps=20, batch_size=32, lr=1e-2, validate_every=10),
                          val_fraction=0.1, progress=False)
    assert result.best_val_loss < 0.9 * result.initial_val_loss, result  # measured 1.73 -> 1.44


def test_cg_options_choose_the_net(chignolin):
    from openmm_flowforce.options import check_options
    from openmm_flowforce.training.flow_matching import CG_OPTIONS, build_cg_net, net_kind

    mapping, frames, _ = chignolin
    assert (net_kind({}, 5), net_kind({}, 10), net_kind({}, 11), net_kind({"kind": "mlp"}, 40)) == \
        ("mlp", "mlp", "schnet", "mlp")  # 10: the MLP (BENCHMARKS.md "CGSchNet speed and the net choice")
    options = check_options({"net": {"kind": "schnet", "hidden": [4], "schnet": {"hidden": 4, "cutoff_nm": 0.9}}},
                            CG_OPTIONS)["net"]
    net = build_cg_net(mapping, frames, 300.0, options)
    assert isinstance(net, CGSchNet) and net.config()["hidden"] == 4 and net.config()["cutoff_nm"] == 0.9
    assert net.config()["bead_types"] == mapping.type_indices
    with pytest.raises(ValueError, match="net.schnet.width"):
        check_options({"net": {"schnet": {"width": 3}}}, CG_OPTIONS)
    with pytest.raises(ValueError, match="net.kind must be one of auto, mlp, schnet"):
        check_options({"net": {"kind": "gnn"}}, CG_OPTIONS)
    assert math.isfinite(float(net(torch.as_tensor(frames[:1], dtype=torch.float32)).detach()))


def test_flowforce_cg_net_schnet_as_in_the_readme_stores_bead_types(chignolin, tmp_path, capsys):
    """The README's ``flowforce cg cln.npz --mapping ca --method force-matching --net schnet`` on a 30-atom
    chignolin backbone (10 Cα beads) trains a CGSchNet whose model file stores the bead types; the README's
    YAML ``net`` section is valid."""
    import re
    from pathlib import Path

    import yaml

    from openmm_flowforce.options import check_options
    from openmm_flowforce.training.flow_matching import CG_OPTIONS
    from openmm_flowforce.cli.main import main
    from openmm_flowforce.data.dataset import save_dataset

    mapping, frames, forces = chignolin
    offsets = np.array([[-0.12, 0.05, 0.0], [0.0, 0.0, 0.0], [0.12, 0.05, 0.0]])  # N, CA, C around each Cα
    atoms = (frames[:, :, None, :] + offsets).reshape(len(frames), 30, 3)
    atom_forces = np.repeat(forces[:, :, None, :] / 3.0, 3, axis=2).reshape(len(frames), 30, 3)
    save_dataset(tmp_path / "cln.npz", topology=chignolin_backbone_topology(), positions=atoms,
                 energies=np.zeros(len(frames)), temperature=300.0, forces=atom_forces)
    (tmp_path / "tiny.yaml").write_text("net: {schnet: {hidden: 8, interactions: 1, n_rbf: 8}}\n"
                                        "cg_train: {steps: 10, validate_every: 5}\n")
    out = tmp_path / "cln.ckpt"
    assert main(["cg", str(tmp_path / "cln.npz"), "--mapping", "ca", "--method", "force-matching", "--net", "schnet",
                 "--out", str(out), "--config", str(tmp_path / "tiny.yaml"), "--quiet"]) == 0
    assert "CG net      schnet, 10 steps" in capsys.readouterr().out
    net, stored = load_cg_net(out)
    assert isinstance(net, CGSchNet) and net.config()["bead_types"] == stored.type_indices == mapping.type_indices
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## CGSchNet"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    assert check_options(yaml.safe_load(block), CG_OPTIONS)["net"]["kind"] == "schnet"
