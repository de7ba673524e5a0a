"""Inverse stability (Behrmann et al., arXiv 2006.09347): the check-flow diagnostic flags an
ill-conditioned spline flow and passes a smooth one; the bi_lipschitz loss term; the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from openmm_flowforce.analysis.flow_stability import THRESHOLDS, check_flow, layer_jacobian_singular_values
from openmm_flowforce.cli.main import main
from openmm_flowforce.flows import CouplingFlow
from openmm_flowforce.flows.losses import bi_lipschitz_on_data
from openmm_flowforce.training.losses import parse_loss_weights, weighted_loss

PERIODIC = [True, False, True, False, False]


def _flow(transform: str, scale: float) -> CouplingFlow:
    """Random (not identity) flow; ``scale`` multiplies every weight, sharpening the layers."""
    torch.manual_seed(1)
    flow = CouplingFlow(PERIODIC, transform=transform, n_layers=4, hidden=16, n_components=4,
                        identity_init=False).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.mul_(scale)
    return flow


def _cube_points(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, len(PERIODIC), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_diagnostic_flags_an_ill_conditioned_spline_flow():
    """Weights ×4: each layer inverts to ~1e-10 but four of them only to ~1e-4 (measured
    6.5e-5 … 3.9e-4 over three seeds of 500 points): an exploding inverse."""
    report = check_flow(_flow("spline", 4.0), _cube_points(500), n_samples=500, n_jacobian=16)
    per_layer = max(layer["round_trip_max"] for layer in report["layers"])
    whole = report["round_trip"]["data_to_latent_to_data"]["max"]
    assert per_layer < 1e-8 < 1e-6 < whole
    assert report["lipschitz"]["inverse"] > 1e12  # measured 3.5e18
    assert not report["ok"]
    assert any(w.startswith("sampling unreliable") for w in report["warnings"])
    assert any(w.startswith("exploding inverse") for w in report["warnings"])
    assert any("inverse Lipschitz" in w for w in report["warnings"])


def test_diagnostic_passes_a_smooth_flow():
    """Same architecture, weights ×2: round trips ≤ 1e-10 (measured 1.1e-11), Lipschitz
    estimates ~1e3 (measured 5-8e2)."""
    report = check_flow(_flow("smooth", 2.0), _cube_points(500), n_samples=500, n_jacobian=16)
    assert report["ok"], report["warnings"]
    assert report["round_trip"]["data_to_latent_to_data"]["max"] < 1e-10
    assert report["round_trip"]["latent_to_data_to_latent"]["max"] < 1e-10
    assert report["log_q_consistency"]["max"] < 1e-9
    assert 1.0 < report["lipschitz"]["inverse"] < 1e4 and 1.0 < report["lipschitz"]["forward"] < 1e4
    assert set(report["thresholds"]) == set(THRESHOLDS)
    json.dumps(report)  # JSON ready


def test_layer_singular_values_match_the_dense_jacobian():
    flow = _flow("ispline", 1.0)
    x = _cube_points(3)
    sigma = layer_jacobian_singular_values(flow.layers[1], x)
    for b in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: flow.layers[1](v[None])[0][0], x[b])
        assert torch.allclose(sigma[b], torch.linalg.svdvals(jac), rtol=1e-10, atol=1e-12)
        # the product of the singular values is |det J| = exp(ladj)
        assert torch.allclose(sigma[b].log().sum(), flow.layers[1](x[b:b + 1])[1][0], atol=1e-10)


def test_bi_lipschitz_term_is_two_at_the_identity_and_grows_with_steepness():
    identity = CouplingFlow(PERIODIC, transform="spline", n_layers=2, hidden=8, n_components=4).double()
    u = _cube_points(32)
    assert float(bi_lipschitz_on_data(identity, u).detach()) == pytest.approx(2.0, abs=1e-6)
    mild, steep = _flow("spline", 1.0), _flow("spline", 3.0)
    torch.manual_seed(0)
    p_mild = float(bi_lipschitz_on_data(mild, u).detach())
    torch.manual_seed(0)
    p_steep = float(bi_lipschitz_on_data(steep, u).detach())
    assert 2.0 < p_mild < p_steep


@pytest.mark.parametrize("transform", ["smooth", "spline", "ispline"])
def test_bi_lipschitz_changes_the_loss_and_its_gradient_is_finite(transform):
    flow = _flow(transform, 1.0)
    x = _cube_points(64)
    base, _ = weighted_loss(flow, parse_loss_weights("nll=1"), x=x)
    torch.manual_seed(0)
    total, terms = weighted_loss(flow, parse_loss_weights("nll=1,bi_lipschitz=0.1"), x=x)
    assert terms["bi_lipschitz"] > 2.0
    assert float(total.detach()) == pytest.approx(float(base.detach()) + 0.1 * terms["bi_lipschitz"], rel=1e-12)
    flow.zero_grad()
    torch.manual_seed(0)
    penalty, _ = weighted_loss(flow, {"bi_lipschitz": 1.0}, x=x)
    penalty.backward()
    grads = [p.grad for p in flow.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_check_flow_cli_end_to_end(tmp_path, capsys):
    """Data → ``flowforce train --transform ispline`` (a few steps of a tiny flow) →
    ``flowforce check-flow`` with a JSON report; a bad flag is exit status 2."""
    from openmm import app, unit

    from openmm_flowforce.data import alanine_dipeptide_pdb
    from openmm_flowforce.data.dataset import save_dataset

    pdb = app.PDBFile(alanine_dipeptide_pdb())
    x0 = np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    rng = np.random.default_rng(0)
    positions = x0[None] + 0.005 * rng.standard_normal((120, *x0.shape))
    data = tmp_path / "ala.npz"
    save_dataset(data, topology=pdb.topology, positions=positions, energies=np.zeros(120), temperature=300.0)
    (tmp_path / "tiny.yaml").write_text("flow: {n_layers: 2, hidden: [16, 16], n_components: 4}\n")
    model = tmp_path / "ala.ckpt"
    assert main(["train", str(data), "--out", str(model), "--steps", "5", "--batch-size", "32", "--transform",
                 "ispline", "--config", str(tmp_path / "tiny.yaml"), "--loss", "nll=1,bi_lipschitz=0.01",
                 "--quiet"]) == 0
    report_path = tmp_path / "check.json"
    assert main(["check-flow", str(model), "--data", str(data), "--samples", "100", "--jacobian-points", "4",
                 "--out", str(report_path)]) == 0
    out = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["ok"] and "ok: no warnings" in out
    assert report["n_data"] == 120 and report["n_samples"] == 100 and len(report["layers"]) == 2
    # an I-spline flow near the identity: float64 round trips at the root finder's tolerance
    assert report["round_trip"]["data_to_latent_to_data"]["max"] < 1e-10
    assert report["lipschitz"]["inverse"] < 10.0

    assert main(["check-flow", str(model), "--samples", "0"]) == 2
    assert "--samples" in capsys.readouterr().err
