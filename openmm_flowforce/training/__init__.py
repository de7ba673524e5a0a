"""Losses (named by what they sample from), the trainer and its reporters."""
from .losses import (LOSS_NAMES, flow_forces, force_matching_on_data, nll_on_data, parse_loss_weights,
                     reverse_kl_on_samples, weighted_loss)
from ..reporters import JSONLinesReporter, ProgressReporter, Reporter, TrainState
from .trainer import TrainConfig, Trainer
from .flow_matching import CG_METHODS, coarse_grain, sample_flow_forces

__all__ = ["LOSS_NAMES", "flow_forces", "force_matching_on_data", "nll_on_data", "parse_loss_weights",
           "reverse_kl_on_samples", "weighted_loss", "JSONLinesReporter", "ProgressReporter", "Reporter",
           "TrainState", "TrainConfig", "Trainer", "CG_METHODS", "coarse_grain", "sample_flow_forces"]
