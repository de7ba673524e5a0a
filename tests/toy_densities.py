"""An analytic density on the torus × interval, with exact samples, log density and score.

φ ∈ [0, 1) (periodic), r ∈ [0, 1]:
    r ~ N(0.5, 0.15²) truncated to [0, 1],
    2πφ | r ~ von Mises(mean 2π(0.2 + 0.5 r), κ = 3).
"""
from __future__ import annotations

import math

import torch

MU_R, SIGMA_R, KAPPA = 0.5, 0.15, 3.0


def _r_log_norm() -> float:
    z = 0.5 * (math.erf((1 - MU_R) / (SIGMA_R * math.sqrt(2))) - math.erf(-MU_R / (SIGMA_R * math.sqrt(2))))
    return math.log(z * SIGMA_R * math.sqrt(2 * math.pi))


def sample(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.empty(0)
    while len(r) < n:
        cand = MU_R + SIGMA_R * torch.randn(2 * n, generator=g, dtype=torch.float64)
        r = torch.cat([r, cand[(cand >= 0) & (cand <= 1)]])
    r = r[:n]
    torch.manual_seed(seed)
    theta = torch.distributions.VonMises(torch.zeros(n, dtype=torch.float64), torch.tensor(KAPPA, dtype=torch.float64)).sample()
    phi = torch.remainder(theta / (2 * math.pi) + 0.2 + 0.5 * r, 1.0)
    return torch.stack([phi, r], dim=1)


def log_prob(x: torch.Tensor) -> torch.Tensor:
    phi, r = x[:, 0], x[:, 1]
    log_r = -0.5 * ((r - MU_R) / SIGMA_R) ** 2 - _r_log_norm()
    # density of φ = 2π × density of θ = exp(κ cos(θ − m)) / I0(κ)
    log_phi = KAPPA * torch.cos(2 * math.pi * (phi - 0.2 - 0.5 * r)) - math.log(torch.special.i0(torch.tensor(KAPPA)).item())
    return log_r + log_phi


def score(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    return torch.autograd.grad(log_prob(x).sum(), x)[0]
