"""Training: a smooth flow learns a known density on torus × interval; force matching
lowers the force error; checkpoints resume exactly; early stopping; bad input."""
from __future__ import annotations

import json

import pytest
import torch

import toy_densities as toy
from openmm_flowforce.flows import CouplingFlow
from openmm_flowforce.training import (JSONLinesReporter, TrainConfig, Trainer, flow_forces,
                                       parse_loss_weights)


pytestmark = pytest.mark.usefixtures("float64")


def _kl(flow, x_test):
    """KL(p‖q) = E_p[log p − log q] on exact samples of p."""
    with torch.no_grad():
        return float((toy.log_prob(x_test) - flow.log_prob(x_test)).mean())


def _small_flow():
    torch.manual_seed(0)
    return CouplingFlow([True, False], transform="smooth", n_layers=4, hidden=32, n_components=6)


@pytest.fixture(scope="module")
def nll_trained():
    """A smooth flow fitted by NLL (module-scoped: the other tests start from it)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    flow = _small_flow()
    data = toy.sample(4000, seed=1)
    Trainer(flow, {"nll": 1.0}, data={"x": data}, val_data={"x": toy.sample(1000, seed=2)},
            config=TrainConfig(steps=400, batch_size=256, lr=5e-3, validate_every=100)).run()
    torch.set_default_dtype(old)
    return flow


def test_smooth_flow_learns_density_on_torus_times_interval(nll_trained):
    x_test = toy.sample(4000, seed=3)
    assert _kl(_small_flow(), x_test) > 0.5          # the identity start is far off ...
    assert _kl(nll_trained, x_test) < 0.06           # ... training gets close (KL in nats)


def test_force_matching_lowers_the_force_error(nll_trained):
    flow = CouplingFlow(**nll_trained.config)
    flow.load_state_dict(nll_trained.state_dict())
    x = toy.sample(2000, seed=4)
    forces = toy.score(x)

    def force_error():
        return float((flow_forces(flow, x)[1] - forces).pow(2).mean())

    before = force_error()
    Trainer(flow, {"nll": 1.0, "force": 0.1}, data={"x": x, "forces": forces},
            config=TrainConfig(steps=150, batch_size=256, lr=2e-3, validate_every=0)).run()
    after = force_error()
    assert after < 0.6 * before, (before, after)


def test_checkpoint_resume_is_exact_and_log_matches(tmp_path):
    data = {"x": toy.sample(500, seed=5)}
    cfg = dict(steps=12, batch_size=32, lr=1e-2, validate_every=4, checkpoint_every=6)

    torch.manual_seed(0)
    straight = CouplingFlow([True, False], n_layers=2, hidden=8, n_components=3)
    Trainer(straight, {"nll": 1}, data=data, val_data=data, config=TrainConfig(**cfg)).run()

    torch.manual_seed(0)
    flow = CouplingFlow([True, False], n_layers=2, hidden=8, n_components=3)
    ckpt, log = tmp_path / "run.ckpt", tmp_path / "metrics.jsonl"
    half = Trainer(flow, {"nll": 1}, data=data, val_data=data, config=TrainConfig(**{**cfg, "steps": 12}),
                   checkpoint=ckpt, reporters=[JSONLinesReporter(log, interval=1)])

    def killed(engine=half.engine):  # a kill -9 after step 8: the checkpoint holds step 6
        if engine.step == 8:
            raise SystemExit("killed")

    half.engine.after_step = killed
    with pytest.raises(SystemExit):
        half.run()
    assert torch.load(ckpt, weights_only=True)["step"] == 6
    with open(log, "a") as torn:  # the kill tore the log's last line
        torn.write('{"step": 9, "lo')

    torch.manual_seed(123)  # resuming must not depend on the caller's RNG state
    resumed_flow = CouplingFlow([True, False], n_layers=2, hidden=8, n_components=3)
    resumed = Trainer(resumed_flow, {"nll": 1}, data=data, val_data=data, config=TrainConfig(**cfg),
                      checkpoint=ckpt, reporters=[JSONLinesReporter(log, interval=1, resume_step=6)])
    assert resumed.step == 6
    resumed.run()
    for a, b in zip(straight.state_dict().values(), resumed_flow.state_dict().values()):
        assert torch.equal(a, b)
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, 13))  # the torn line and steps 7, 8 after the checkpoint are gone


def test_early_stopping_restores_the_best_validation_state():
    torch.manual_seed(0)
    flow = CouplingFlow([True, False], n_layers=2, hidden=8, n_components=3)
    train, val = toy.sample(64, seed=6), toy.sample(2000, seed=7)
    trainer = Trainer(flow, {"nll": 1}, data={"x": train}, val_data={"x": val},
                      config=TrainConfig(steps=3000, batch_size=64, lr=3e-2, validate_every=10, patience=3))
    trainer.run()
    assert trainer.stopped_early and trainer.step < 3000
    assert abs(trainer.validation_nll() - trainer.best_val) < 1e-12


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    flow = CouplingFlow([True])
    with pytest.raises(ValueError, match="corrupt"):
        Trainer(flow, {"nll": 1}, data={"x": torch.rand(10, 1)}, checkpoint=bad)


def test_loss_weights_and_config_are_validated():
    assert parse_loss_weights("nll=1,force=0.1") == {"nll": 1.0, "force": 0.1}
    with pytest.raises(ValueError, match="valid names: nll, force, reverse_kl"):
        parse_loss_weights("nll=1,forces=0.1")
    with pytest.raises(ValueError, match="needs a weight"):
        parse_loss_weights("nll")
    with pytest.raises(ValueError, match="unknown option learning_rate; valid: steps"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    flow = CouplingFlow([True])
    with pytest.raises(ValueError, match="reference forces"):
        Trainer(flow, {"force": 1}, data={"x": torch.rand(10, 1)}).train_step()


def test_reverse_kl_trains_towards_an_energy():
    """Reverse KL with the implicit-gradient inverse pulls a flow towards exp(−u)."""
    torch.manual_seed(0)
    flow = _small_flow()
    x_test = toy.sample(2000, seed=8)
    before = _kl(flow, x_test)
    Trainer(flow, {"reverse_kl": 1.0}, reduced_energy=lambda x: -toy.log_prob(x),
            config=TrainConfig(steps=120, batch_size=128, lr=5e-3, validate_every=0)).run()
    assert _kl(flow, x_test) < 0.5 * before
