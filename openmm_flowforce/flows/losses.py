"""The losses of density models, named by what they sample from (the maths only: no
optimiser, no data handling, no OpenMM).

All are in reduced units (energies ÷ kT, forces ÷ kT). A *density model* has
``log_prob(x) -> (B,)`` and ``sample_and_log_prob(n) -> (x, log q)``; flows on the unit
cube, real-space flows and Boltzmann generators over Cartesian coordinates all qualify.
They live here, below ``samplers`` and ``training``, because both use them.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from .coupling import CouplingFlow

Tensor = torch.Tensor

__all__ = ["DensityModel", "bi_lipschitz_on_data", "flow_forces", "force_matching_on_data", "nll_on_data",
           "reverse_kl_on_samples"]


class DensityModel(Protocol):
    def log_prob(self, x: Tensor) -> Tensor: ...

    def sample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]: ...


def nll_on_data(model: DensityModel, x: Tensor) -> Tensor:
    """Negative log-likelihood of data: −E_data[log q(x)] (maximum likelihood, forward KL)."""
    return -model.log_prob(x).mean()


def flow_forces(model: DensityModel, x: Tensor, create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """Reduced forces of a density, ∇ₓ log q(x) (multiply by kT for kJ/mol/nm).

    Returns ``(log q (B,), forces shaped like x)``. With ``create_graph`` the forces stay
    differentiable with respect to the model's parameters (double backward).
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        log_q = model.log_prob(x)
        (forces,) = torch.autograd.grad(log_q.sum(), x, create_graph=create_graph)
    return log_q, forces


def force_matching_on_data(model: DensityModel, x: Tensor, reduced_forces: Tensor) -> Tensor:
    """Mean squared error between ∇ₓ log q and reference forces ÷ kT, per coordinate.

    Minimising it makes −kT·log q a potential whose forces match the reference: the
    force-matching principle (Köhler et al., JCTC 2023, arXiv 2203.11167).
    """
    _, forces = flow_forces(model, x, create_graph=True)
    return (forces - reduced_forces).pow(2).flatten(1).mean(1).mean()


def reverse_kl_on_samples(model: DensityModel, reduced_energy: Callable[[Tensor], Tensor], n: int) -> Tensor:
    """E_q[log q(x) + u(x)] on n flow samples: KL(q‖p) up to log Z.

    Sampling uses the root-finding inverse whose gradients come from the inverse
    function theorem, so the loss is differentiable in the flow's parameters.
    """
    x, log_q = model.sample_and_log_prob(n)
    return (log_q + reduced_energy(x)).mean()


def bi_lipschitz_on_data(flow: CouplingFlow, u: Tensor, eps: float = 1e-2) -> Tensor:
    """Bi-directional finite-difference penalty on the local Lipschitz constants of a flow.

    Behrmann, Vicol, Wang, Grosse, Jacobsen, "Understanding and mitigating exploding
    inverses in invertible neural networks", AISTATS 2021, arXiv 2006.09347 (their
    bi-directional finite-difference regulariser). With ``F = to_latent``, ``z = F(u)`` and
    random unit directions ``v, w``:

        mean over points of  (|F(u + εv) − F(u)| / ε)² + (|F⁻¹(z + εw) − F⁻¹(z)| / ε)²,

    which is 2 for the identity and grows with the steepest slope of either direction.
    Points are first moved ε inside the cube so the steps stay in ``[0, 1]^D``. The
    inverse uses the root-finding ``to_data`` with implicit gradients, so both terms are
    differentiable in the flow's parameters.

    Args:
        flow: the coupling flow.
        u: ``(B, D)`` points in the unit cube (data in the flow's coordinates).
        eps: finite-difference step in cube units.

    Returns:
        The penalty, a scalar tensor.
    """
    u = u.detach().clamp(eps, 1.0 - eps)
    v = torch.nn.functional.normalize(torch.randn_like(u), dim=1)
    w = torch.nn.functional.normalize(torch.randn_like(u), dim=1)
    z_pair, _ = flow.to_latent(torch.cat([u, u + eps * v]))
    z, z_step = z_pair.chunk(2)
    forward = (z_step - z).norm(dim=1) / eps
    z = z.detach().clamp(eps, 1.0 - eps)
    x_pair, _ = flow.to_data(torch.cat([z, z + eps * w]))
    x, x_step = x_pair.chunk(2)
    inverse = (x_step - x).norm(dim=1) / eps
    return (forward.pow(2) + inverse.pow(2)).mean()
