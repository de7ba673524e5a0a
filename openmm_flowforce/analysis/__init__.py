"""Analysis: importance weights and effective sample sizes; later free-energy surfaces,
divergences, sampler metrics and plots."""
from .reweighting import effective_sample_size, log_importance_weights

__all__ = ["effective_sample_size", "log_importance_weights"]
