"""Self-normalised importance weights of samples from a density q towards exp(−u).

Pure maths over log weights, at the bottom of the package: samplers, sampling from
Boltzmann generators and the analysis all use it."""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def log_importance_weights(reduced_energy: Tensor, log_q: Tensor) -> Tensor:
    """log w = −u(x) − log q(x), shifted so that max log w = 0; non-finite energies get
    weight 0 (log w = −inf)."""
    log_w = -reduced_energy - log_q
    log_w = torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -torch.inf))
    return log_w - log_w.max()


def effective_sample_size(log_w: Tensor) -> float:
    """Kish's effective sample size as a fraction of the sample count,
    (Σw)² / (n·Σw²) ∈ (0, 1]; 1 means q equals the target."""
    w = torch.exp(log_w - log_w.max())
    return float(w.sum() ** 2 / (len(w) * (w * w).sum()))
