"""CGSchNet's fast path (fused filters, one filter per pair for both directions, the fixed-capacity
neighbour list ``max_pairs``) computes what the module docstring says: checked against a dense,
loop-free re-statement of the maths in float64, by finite differences, and through the export."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional

from openmm_flowforce.coordinates.cg_mapping import CGMapping
from openmm_flowforce.errors import FlowforceError
from openmm_flowforce.potentials.cg_net import net_from_metadata
from openmm_flowforce.potentials.schnet import CGSchNet
from test_cg_schnet import chignolin  # noqa: F401 - fixture

LOG2 = math.log(2.0)


def dense_schnet_energy(net: CGSchNet, x: torch.Tensor) -> torch.Tensor:
    """SchNet energy (kT) ``(B,)`` of positions ``(B, n, 3)`` written over the full ``(B, n, n)`` distance
    matrix, straight from the module docstring: no pair lists, no fusion; the reference."""
    network = net.network
    n = x.shape[1]
    d = torch.linalg.vector_norm(x[:, :, None] - x[:, None, :] + torch.eye(n, dtype=x.dtype)[..., None], dim=-1)
    rbf = torch.exp(-network.gamma * (d.unsqueeze(-1) - network.centres) ** 2)  # (B, n, n, K)
    cut = torch.where(d < network.cutoff, 0.5 * (torch.cos(d * math.pi / network.cutoff) + 1), torch.zeros_like(d))
    cut = cut * (1 - torch.eye(n, dtype=x.dtype))  # no self-interaction
    h = network.embedding(network.bead_types).expand(x.shape[0], -1, -1)  # (B, n, F)
    for block in network.interactions:
        first, second = block.filter[0], block.filter[2]
        w = functional.linear(functional.softplus(functional.linear(rbf, first.weight, first.bias)) - LOG2,
                              second.weight, second.bias) * cut.unsqueeze(-1)  # (B, n, n, F)
        pooled = (w * block.in_to_filter(h).unsqueeze(1)).sum(2)  # Σ_j W_ij ∘ Dense(h_j)
        up0, up1 = block.update[0], block.update[2]
        h = h + functional.linear(functional.softplus(functional.linear(pooled, up0.weight, up0.bias)) - LOG2,
                                  up1.weight, up1.bias)
    r0, r1 = network.readout[0], network.readout[2]
    return functional.linear(functional.softplus(functional.linear(h, r0.weight, r0.bias)) - LOG2,
                             r1.weight, r1.bias).sum((1, 2))


def dense_energy_and_forces(net: CGSchNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    energy = net.prior_energy(x) + net.energy_scale * dense_schnet_energy(net, x)
    (gradient,) = torch.autograd.grad(energy.sum(), x)
    return energy.detach(), -gradient


def chain(n: int, n_frames: int, seed: int = 0) -> tuple[CGMapping, np.ndarray]:
    """A Cα chain of n ALA beads, random walk with 0.38 nm bonds drifting along x, + 0.02 nm noise."""
    from openmm import app

    top = app.Topology()
    c = top.addChain("A")
    for k in range(n):  # N, CA, C per residue: what the ca mapping reads
        residue = top.addResidue("ALA", c, str(k + 1))
        for name in ("N", "CA", "C"):
            top.addAtom(name, app.Element.getBySymbol(name[0]), residue)
    atoms = list(top.atoms())
    for a, b in zip(atoms[:-1], atoms[1:]):
        top.addBond(a, b)
    rng = np.random.default_rng(seed)
    steps = rng.standard_normal((n, 3))
    steps[:, 0] = np.abs(steps[:, 0]) + 0.8
    steps *= 0.38 / np.linalg.norm(steps, axis=1, keepdims=True)
    return CGMapping.from_topology(top, "ca"), np.cumsum(steps, 0)[None] + 0.02 * rng.standard_normal((n_frames, n, 3))


def make(mapping, frames, seed: int = 0, **options) -> CGSchNet:
    torch.manual_seed(seed)
    options = {"hidden": 8, "interactions": 2, "n_rbf": 8, "cutoff_nm": 1.0, **options}
    net = CGSchNet.from_data(mapping, frames, 300.0, **options).double()
    torch.nn.init.normal_(net.network.readout[-1].weight, std=0.3)
    for p in net.parameters():  # non-trivial biases everywhere, so a dropped term would show
        if p.ndim == 1:
            torch.nn.init.normal_(p, std=0.2)
    return net.eval()


@pytest.mark.parametrize("interactions", [0, 1, 3])
def test_fast_path_equals_the_dense_maths_to_1e_10(chignolin, interactions):  # noqa: F811
    mapping, frames, _ = chignolin
    net = make(mapping, frames, hidden=6, interactions=interactions, n_rbf=5)
    x = torch.as_tensor(frames[:6])
    energy, forces = net.energy_and_forces(x)
    want_energy, want_forces = dense_energy_and_forces(net, x)
    assert want_energy.std() > 0.1 and want_forces.abs().max() > 10  # the check can fail
    torch.testing.assert_close(energy, want_energy, rtol=0, atol=1e-10 * (1 + float(want_energy.abs().max())))
    torch.testing.assert_close(forces, want_forces, rtol=0, atol=1e-10 * (1 + float(want_forces.abs().max())))


def test_neighbour_list_equals_all_pairs_and_matches_finite_differences():
    """35-bead chain: about 100 of 595 pairs are within 1 nm; a list of 200 gives the all-pairs energy
    and forces to 1e-10, forces that match central differences, and float64 gradcheck."""
    mapping, frames = chain(35, 40)
    full = make(mapping, frames[:30])
    within = int((full.features(torch.as_tensor(frames)) < 1.0).sum(1).max())
    assert 50 < within < 200, within  # the list is much shorter than 595 and still holds every pair
    listed = make(mapping, frames[:30], max_pairs=200)
    assert listed.config()["max_pairs"] == 200
    x = torch.as_tensor(frames[30:])
    energy, forces = (t.detach() for t in listed.energy_and_forces(x))
    want_energy, want_forces = (t.detach() for t in full.energy_and_forces(x))
    torch.testing.assert_close(energy, want_energy, rtol=0, atol=1e-10 * (1 + float(want_energy.abs().max())))
    torch.testing.assert_close(forces, want_forces, rtol=0, atol=1e-10 * (1 + float(want_forces.abs().max())))
    torch.testing.assert_close(energy, dense_energy_and_forces(full, x)[0], rtol=0, atol=1e-9)
    direction = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    h = 1e-5  # five-point stencil: the stiff bonds of a 0.02 nm-noise chain need the 4th order
    with torch.no_grad():
        e = {k: listed(x + k * h * direction) for k in (-2, -1, 1, 2)}
    slope = (e[-2] - 8 * e[-1] + 8 * e[1] - e[2]) / (12 * h)
    torch.testing.assert_close(slope, -(forces * direction).sum((1, 2)), rtol=1e-8, atol=1e-6)
    small = make(mapping, frames[:30], hidden=3, interactions=1, n_rbf=3, max_pairs=150)
    y = torch.as_tensor(frames[30:31]).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(small, (y,))


def test_neighbour_list_overflow_gives_nan_and_fit_refuses_a_short_list():
    mapping, frames = chain(35, 40)
    net = make(mapping, frames[:30], max_pairs=200)
    squeezed = torch.as_tensor(frames[30:32]).clone()
    squeezed[0] *= 0.3  # every bead within ~3 nm of every other: far more than 200 pairs within 1 nm
    energy, forces = (t.detach() for t in net.energy_and_forces(squeezed))
    assert math.isnan(float(energy[0])) and bool(forces[0].isnan().all())
    assert math.isfinite(float(energy[1])) and bool(forces[1].isfinite().all())  # the other frame is untouched
    with pytest.raises(FlowforceError, match=r"max_pairs=20 but the data have up to \d+ pairs within the 1 nm"):
        make(mapping, frames[:30], max_pairs=20)
    with pytest.raises(FlowforceError, match="max_pairs"):
        CGSchNet(35, [], max_pairs=0)


def test_configs_without_max_pairs_still_load_and_state_dicts_match(chignolin):  # noqa: F811
    mapping, frames, _ = chignolin
    net = make(mapping, frames)
    config = net.config()
    del config["max_pairs"]  # as model files written before the option existed
    old = net_from_metadata({"kind": "cg_energy_net", "net": config}).double()
    old.load_state_dict(net.state_dict())  # the same buffers and parameters as before
    x = torch.as_tensor(frames[:3])
    torch.testing.assert_close(old(x), net(x), rtol=0, atol=0)


def test_neighbour_list_scripts_for_torchforce():
    from openmm_flowforce.export.cg import build_cg_module

    mapping, frames = chain(35, 40)
    net = make(mapping, frames[:30], max_pairs=200)
    scripted = build_cg_module(net)
    x = torch.as_tensor(frames[31])
    energy, forces = scripted(x.clone().requires_grad_(True))
    want_energy, want_forces = (t.detach() for t in net.energy_and_forces(x[None]))
    torch.testing.assert_close(energy.detach(), want_energy[0], rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(forces, want_forces[0], rtol=1e-10, atol=1e-9)


@pytest.mark.slow
def test_neighbour_list_exports_with_fixed_shapes():
    """The traced energy+forces graph that ``torch.export`` (strict) takes, for one configuration and
    for a dynamic batch, gives the eager energies and forces; it has no host synchronisation (``topk``
    has a fixed output shape)."""
    from openmm_flowforce.export.graph import check_against_eager, export_program, trace_energy_and_forces
    from openmm_flowforce.export.models import CGEnergy

    mapping, frames = chain(35, 40)
    net = make(mapping, frames[:30], max_pairs=200)
    x = torch.as_tensor(frames[31])
    energy_module = CGEnergy(net, torch.float64).eval()
    graph = trace_energy_and_forces(energy_module, x)
    program = export_program(graph, x)
    check_against_eager(program.module(), energy_module, x, rtol=1e-12)
    batch = torch.as_tensor(frames[30:34])  # and with a dynamic batch size, checked on 7 frames
    program = export_program(trace_energy_and_forces(energy_module, batch, batched=True), batch, batched=True)
    check_against_eager(program.module(), energy_module, torch.as_tensor(frames[31:38]), rtol=1e-12)


def test_flowforce_cg_options_take_max_pairs():
    from openmm_flowforce.options import check_options
    from openmm_flowforce.training.flow_matching import CG_OPTIONS, build_cg_net

    mapping, frames = chain(35, 30)
    options = check_options({"net": {"kind": "schnet", "schnet": {"hidden": 4, "interactions": 1, "n_rbf": 4,
                                                                  "cutoff_nm": 1.0, "max_pairs": 150}}},
                            CG_OPTIONS)["net"]
    net = build_cg_net(mapping, frames, 300.0, options)
    assert net.config()["max_pairs"] == 150 and net.network.max_pairs == 150
    with pytest.raises(ValueError, match="max_pairs"):
        check_options({"net": {"schnet": {"max_pairs": 0}}}, CG_OPTIONS)
