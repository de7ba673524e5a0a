"""Analysis: importance weights and effective sample sizes; later free-energy surfaces,
divergences, sampler metrics and plots."""
from ..reweighting import effective_sample_size, log_importance_weights
from .metrics import (aligned_cost_matrix, ess, interatomic_distances, log_partition,
                      tv_distance_histograms, w2_energy, w2_samples, wasserstein_samples)
from .fes import PHI_PSI, compare_fes, compute_cvs, divergences, parse_cv, plot_fes

__all__ = ["aligned_cost_matrix", "effective_sample_size", "ess", "interatomic_distances",
           "log_importance_weights", "log_partition", "tv_distance_histograms", "w2_energy", "w2_samples",
           "wasserstein_samples", "PHI_PSI", "compare_fes", "compute_cvs", "divergences", "parse_cv", "plot_fes"]
