"""``flowforce sample``: draw Cartesian samples from a trained Boltzmann generator, and
optionally reweight them to the reference force field's Boltzmann distribution."""
from __future__ import annotations

import argparse

from openmm_flowforce.cli.config import CommandFiles, flag
from openmm_flowforce.options import COUNT, POSITIVE_INT, SEED

HELP = "draw samples (nm) and log q from a trained model; --reweight adds importance weights and the ESS"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.ckpt", help="model file written by `flowforce train`")
    parser.add_argument("-n", "--n-samples", type=flag(POSITIVE_INT), required=True, help="number of samples")
    parser.add_argument("--out", required=True, metavar="SAMPLES.npz", help="output file")
    parser.add_argument("--reweight", action="store_true",
                        help="evaluate the reference force field (stored in the model file) on every sample and "
                             "save reduced energies, log importance weights and the effective sample size")
    parser.add_argument("--batch", type=flag(POSITIVE_INT), default=1000, help="samples drawn per batch (memory)")
    parser.add_argument("--seed", type=flag(SEED), default=0)
    parser.add_argument("--workers", type=flag(COUNT), default=0, help="OpenMM worker processes for --reweight")


def files(args: argparse.Namespace) -> CommandFiles:
    return CommandFiles(inputs={"MODEL.ckpt": args.model}, outputs={"--out": args.out})


def run(args: argparse.Namespace) -> int:
    import torch

    from openmm_flowforce.md.sampling import sample_boltzmann_generator

    torch.set_num_threads(1)
    summary = sample_boltzmann_generator(args.model, args.n_samples, args.out, reweight=args.reweight,
                                         batch=args.batch, seed=args.seed, n_workers=args.workers)
    print(f"{summary['n_samples']} samples -> {args.out}")
    if args.reweight:
        print(f"effective sample size {summary['ess']:.4f} of {summary['n_samples']} "
              f"({summary['ess'] * summary['n_samples']:.1f} samples); "
              f"{summary['n_nonfinite']} samples with non-finite energy got weight 0")
    return 0
