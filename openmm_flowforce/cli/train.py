"""``flowforce train``: fit a Boltzmann generator (internal coordinates + smooth flow) to
the frames of a ``flowforce md`` data file."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from openmm_flowforce.cli.config import CommandFiles, flag, load_config
from openmm_flowforce.cli.data import add_data_arguments, data_inputs, load_data_from_args
from openmm_flowforce.options import FRACTION, POSITIVE, Option

HELP = "train a Boltzmann generator on MD data (flowforce md output)"

#: Loss when the data file has forces: NLL plus force matching, which keeps the flow
#: potential as smooth as the reference (BENCHMARKS.md, "flow potentials in MD").
DEFAULT_LOSS = "nll=1,force=0.001"

EPILOG = """\
examples:
  flowforce train ala2.npz --out ala2.ckpt --epochs 20
  flowforce train ala2.npz --out ala2.ckpt --loss nll=1,force=0.001 --config train.yaml
  flowforce train run1.xtc run2.xtc --topology ala2.pdb --forces forces.npy --stride 10 --out ala2.ckpt
  torchrun --nproc-per-node 4 -m openmm_flowforce.cli.main train big.npz --out big.ckpt --batch-size 1024
      (data parallel: each process takes a quarter of every batch; NCCL on GPUs, gloo on CPU)

config file (YAML; command-line flags win; every value is checked, unknown keys refused):
  flow:  {transform: smooth, n_layers: 8, hidden: [128, 128], n_components: 8}
  train: {batch_size: 256, lr: 0.001, validate_every: 200, patience: 10, seed: 0}
  loss:  {nll: 1.0, force: 0.001}
  epochs: 20
  val_fraction: 0.1

Re-running the same command continues from MODEL.ckpt if it exists (exact resume; --steps
or --epochs may grow). A MODEL.ckpt trained from other data or with other flow options is
refused, naming what differs; --restart starts over and keeps the old file as MODEL.ckpt.prev.
Ctrl-C (or SIGTERM) finishes the current step and saves MODEL.ckpt first.
"""


def config_schema() -> dict[str, Option]:
    """``--config`` keys; the flags below use the same options."""
    from openmm_flowforce.training.boltzmann import FLOW_OPTIONS
    from openmm_flowforce.training.trainer import TRAIN_CONFIG_OPTIONS

    return {"flow": Option(dict, fields=FLOW_OPTIONS), "train": Option(dict, fields=TRAIN_CONFIG_OPTIONS),
            "loss": Option(object), "epochs": POSITIVE, "val_fraction": FRACTION}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from openmm_flowforce.training.trainer import TRAIN_CONFIG_OPTIONS as TRAIN

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    add_data_arguments(parser, "DATA.npz")
    parser.add_argument("--out", required=True, metavar="MODEL.ckpt", help="model file to write (resumes if present)")
    parser.add_argument("--loss", metavar="TERMS",
                        help="weighted loss terms (default: nll=1,force=0.001 when the data have forces, else nll=1; "
                             "the force term keeps the learned potential smooth enough for MD; bi_lipschitz=W adds "
                             "a penalty on steep layers that keeps sampling invertible, see flowforce check-flow)")
    parser.add_argument("--epochs", type=flag(POSITIVE), help="passes over the training frames (> 0, default 20)")
    parser.add_argument("--steps", type=flag(TRAIN["steps"]), help="optimiser steps; overrides --epochs")
    parser.add_argument("--batch-size", type=flag(TRAIN["batch_size"]), help="frames per step (default 256)")
    parser.add_argument("--lr", type=flag(TRAIN["lr"]), help="initial learning rate of Adam (default 1e-3)")
    from openmm_flowforce.bijections import family_names

    parser.add_argument("--transform", choices=list(family_names()),
                        help="flow transform (default smooth; ispline is C³, ispline-cS C^S)")
    parser.add_argument("--seed", type=flag(TRAIN["seed"]), help="random seed (default 0)")
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML options (see below)")
    parser.add_argument("--log", metavar="METRICS.jsonl", help="metrics log (default: MODEL.ckpt with .jsonl)")
    parser.add_argument("--restart", action="store_true",
                        help="start over even if MODEL.ckpt exists (it is kept as MODEL.ckpt.prev)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _log_path(args: argparse.Namespace) -> Path:
    return Path(args.log) if args.log else Path(args.out).with_suffix(".jsonl")


def files(args: argparse.Namespace) -> CommandFiles:
    return CommandFiles(inputs={**data_inputs(args, "DATA.npz"), "--config": args.config},
                        outputs={"--out": args.out, "--log": _log_path(args)}, resumable=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from openmm_flowforce.training import TrainConfig, parse_loss_weights
    from openmm_flowforce.training.boltzmann import split_frames, steps_for_epochs, train_boltzmann_generator

    from openmm_flowforce.engine import init_distributed, world

    torch.set_num_threads(1)
    device = init_distributed() or torch.device("cpu")  # under torchrun: one process per GPU, or gloo on CPU
    cfg = load_config(args.config, config_schema())
    data = load_data_from_args(args)
    weights = parse_loss_weights(args.loss or cfg.get("loss", DEFAULT_LOSS if data.forces is not None else "nll=1"),
                                 where="--loss" if args.loss else str(args.config or ""))
    if "force" not in weights:
        print("flowforce train: note: training without the force term; a flow fitted by NLL alone "
              "learns features finer than the thermal width, and MD with it may need a very short "
              "time step (see BENCHMARKS.md)", file=sys.stderr)
    flow = dict(cfg.get("flow", {}))
    if args.transform:
        flow["transform"] = args.transform
    train = dict(cfg.get("train", {}))
    for key in ("batch_size", "lr", "seed"):
        if getattr(args, key) is not None:
            train[key] = getattr(args, key)
    val_fraction = float(cfg.get("val_fraction", 0.1))
    n_train = split_frames(data.n_frames, val_fraction)[0].stop
    train.setdefault("batch_size", min(256, n_train))
    if args.steps is not None:
        train["steps"] = args.steps
    elif "steps" not in train:
        epochs = args.epochs if args.epochs is not None else float(cfg.get("epochs", 20))
        train["steps"] = steps_for_epochs(epochs, n_train, int(train["batch_size"]))
    config = TrainConfig.from_dict(train)
    out = Path(args.out)
    log = _log_path(args)
    if args.restart and world()[0] == 0:
        from openmm_flowforce.engine import restart

        restart(out, log)
    if world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()  # no process may read MODEL.ckpt while rank 0 moves it away
    model, trainer = train_boltzmann_generator(
        data.topology, data.positions, out, forces_kj_mol_nm=data.forces, temperature=data.temperature,
        weights=weights, flow=flow, config=config, val_fraction=val_fraction, log_path=log,
        progress=not args.quiet, extra_metadata={"data_source": data.source, "system_xml": data.system_xml},
        device=device)
    best = f", best validation NLL {trainer.best_val:.3f}" if trainer.best_state is not None else ""
    stop = " (stopped early)" if trainer.stopped_early else ""
    if world()[0] != 0:
        return 0
    print(f"trained {trainer.step} steps{stop}{best}; model: {out}; metrics: {log}")
    return 0
