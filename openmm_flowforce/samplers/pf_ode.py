"""Probability-flow ODE: the normalised log density of a variance-exploding score model.

A score model s(z, t) ≈ ∇_z log p_t(z) of the VE diffusion ``dz = g(t) dW`` defines the
deterministic flow (Song et al. 2021, "Score-based generative modeling through SDEs",
arXiv 2011.13456, eq. 13 and §4.3)

.. math::
    \\frac{dz}{dt} = f(z, t) = −\\tfrac12 g(t)^2 s(z, t),

whose marginals equal the SDE's. Along a solution the log density obeys the
instantaneous change of variables (Chen et al. 2018, Neural ODEs, arXiv 1806.07366)
``d log p_t(z_t)/dt = −∇·f(z_t, t)``, so with the prior ``p_1 = N(0, σ(1)² I)``

.. math::
    \\log q(z_0) = \\log p_1(z_1) + \\int_0^1 ∇·f(z_t, t)\\, dt.

The model density q is the push-forward of the prior by the ODE run from t = 1 to 0: it
is a normalised density (up to the integrator's error) whatever the quality of s.

Particle targets (mean-free, iDEM's EGNN) live on the zero-centre-of-mass subspace
``V = {z : Σ_i z_i = 0}`` of dimension ``n = (N − 1)·d`` (N particles in d dimensions;
DW-4: 6 of 8, LJ-13: 36 of 39). Densities are with respect to Lebesgue measure on V (in
an orthonormal basis Q of V, ``(dim, n)``): the prior is ``N(0, σ² I_n)`` there, so its
log density has ``−n/2 · log(2πσ²)``, and the divergence is the trace of the Jacobian
restricted to V, ``tr(Qᵀ J Q)``. The flows' log q of particle targets is defined on the
same subspace, so the NLL columns compare. Vector targets have ``Q = I``, ``n = dim``.

Divergence estimators (registry :data:`DIVERGENCES`):

* ``"exact"``: ``Σ_k q_kᵀ J q_k``, one vector–Jacobian product per basis vector (n
  backward passes per evaluation; DW-4 6, LJ-13 36).
* ``"hutchinson"``: ``(1/M) Σ_m v_mᵀ J v_m`` with ``v = Q Qᵀ ε``, ε Rademacher
  (Hutchinson 1989; FFJORD, Grathwohl et al. 2018, arXiv 1810.01367, which keeps the
  probes fixed along a trajectory, as here). Unbiased, since ``E[v vᵀ] = P = Q Qᵀ``. With
  C the symmetrised ``P J P`` in flat coordinates, one probe's estimate has variance
  ``2(‖C‖_F² − Σ_i C_ii²) ≤ 2‖C‖_F²``; the mean of M probes has standard error
  ``√(variance/M)``, and the error of log q (the estimates integrated along the
  trajectory) falls as ``1/√M`` too. Costs M backward passes per evaluation.

The time integrator is the classical fixed-step Runge–Kutta 4 on the augmented state
``(z, ℓ)`` with ``dℓ/dt = −∇·f``, uniform in t (for the geometric schedule this is uniform
in log σ once σ ≫ σ_min, where the flow is smooth).
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from ..errors import FlowforceError

Tensor = torch.Tensor
Score = Callable[[Tensor, Tensor], Tensor]
Field = Callable[[Tensor], Tensor]

class NoiseSchedule(Protocol):
    """A VE schedule: ``variance(t)`` (σ² added from 0 to t) and ``g2(t) = dσ²/dt``, t ``(B,)`` or scalar."""

    def variance(self, t: Tensor) -> Tensor: ...

    def g2(self, t: Tensor) -> Tensor: ...


__all__ = ["DIVERGENCES", "NoiseSchedule", "ProbabilityFlow", "divergence_exact", "divergence_hutchinson",
           "mean_free_basis", "subspace_dimension"]


def subspace_dimension(dim: int, particles: tuple[int, int] | None) -> int:
    """Dimension of the space the density lives on: ``(N − 1)·d`` for particles, else dim."""
    return dim if particles is None else (particles[0] - 1) * particles[1]


def mean_free_basis(dim: int, particles: tuple[int, int] | None, dtype: torch.dtype = torch.float64) -> Tensor:
    """Orthonormal basis Q ``(dim, n)`` of the zero-centre-of-mass subspace (identity for vectors).

    Flat coordinates are particle-major (``z[i·d + a]`` = particle i, axis a), as
    everywhere in the package; Q = H ⊗ I_d with H ``(N, N − 1)`` orthonormal columns
    orthogonal to the all-ones vector.
    """
    if particles is None:
        return torch.eye(dim, dtype=dtype)
    n_particles, spatial = particles
    if n_particles * spatial != dim:
        raise FlowforceError(f"particles {particles} do not make dimension {dim}")
    centring = torch.eye(n_particles, dtype=torch.float64) - 1.0 / n_particles
    # The centring matrix has eigenvalue 1 on the mean-free vectors and 0 on the ones vector.
    _, vectors = torch.linalg.eigh(centring)
    h = vectors[:, 1:].contiguous()  # eigh returns column-major vectors; kron wants rows
    return torch.kron(h, torch.eye(spatial, dtype=torch.float64)).to(dtype)


def _quadratic_forms(field: Field, z: Tensor, vectors: Tensor) -> tuple[Tensor, Tensor]:
    """f(z) ``(B, dim)`` and ``v_kᵀ J(z) v_k`` ``(K, B)`` for vectors ``(K, B, dim)``.

    One forward and one backward pass over K stacked copies of the batch (the field acts
    on every row separately), which is much faster than K backward passes of one batch.
    """
    k, b, dim = vectors.shape
    with torch.enable_grad():
        y = z.detach().repeat(k, 1).requires_grad_(True)
        f = field(y)
        v = vectors.reshape(k * b, dim)
        (rows,) = torch.autograd.grad((f * v).sum(), y)
    return f[:b].detach(), (rows * v).sum(-1).reshape(k, b).detach()


def divergence_exact(field: Field, z: Tensor, basis: Tensor, probes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """f(z) ``(B, dim)`` and its exact divergence on span(basis) ``(B,)``: ``Σ_k q_kᵀ J q_k``."""
    del probes  # exact: no random probes
    f, forms = _quadratic_forms(field, z, basis.T[:, None, :].expand(basis.shape[1], *z.shape))
    return f, forms.sum(0)


def divergence_hutchinson(field: Field, z: Tensor, basis: Tensor, probes: Tensor | None = None
                          ) -> tuple[Tensor, Tensor]:
    """f(z) and the Hutchinson estimate ``(1/M) Σ_m v_mᵀ J v_m`` for ``probes`` v ``(M, B, dim)``."""
    if probes is None:
        raise FlowforceError("the hutchinson divergence needs probe vectors")
    f, forms = _quadratic_forms(field, z, probes)
    return f, forms.mean(0)


#: Divergence estimators by name (the ``divergence`` option of iDEM).
DIVERGENCES: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "exact": divergence_exact,
    "hutchinson": divergence_hutchinson,
}


class ProbabilityFlow:
    """The probability-flow ODE of a VE score model, with its log density.

    Args:
        score: ``s(z, t)`` for z ``(B, dim)``, t ``(B,)`` → ``(B, dim)``.
        schedule: with ``variance(t)`` (σ² added from 0 to t) and ``g2(t) = dσ²/dt``.
        dim: flat dimension; particles: ``(N, d)`` for mean-free particle systems.
        steps: RK4 steps from t = 0 to 1.
        divergence: a name of :data:`DIVERGENCES`.
        n_probes: Hutchinson probes per trajectory (ignored by ``"exact"``).
    """

    def __init__(self, score: Score, schedule: NoiseSchedule, dim: int, particles: tuple[int, int] | None,
                 steps: int = 100, divergence: str = "exact", n_probes: int = 1):
        if divergence not in DIVERGENCES:
            raise FlowforceError(f"unknown divergence {divergence!r}; valid: {', '.join(DIVERGENCES)}")
        if steps < 1 or n_probes < 1:
            raise FlowforceError(f"steps and n_probes must be positive, got {steps}, {n_probes}")
        self.score, self.schedule = score, schedule
        self.dim, self.particles = int(dim), particles
        self.n = subspace_dimension(self.dim, particles)
        self.steps, self.divergence, self.n_probes = int(steps), divergence, int(n_probes)

    def _project(self, z: Tensor) -> Tensor:
        if self.particles is None:
            return z
        p = z.reshape(z.shape[0], *self.particles)
        return (p - p.mean(dim=1, keepdim=True)).reshape(z.shape)

    def prior_std(self) -> float:
        return float(self.schedule.variance(torch.tensor(1.0, dtype=torch.float64)).sqrt())

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """log N(z; 0, σ(1)² I_n) on the subspace, ``(B,)``."""
        var = self.prior_std() ** 2
        return -0.5 * (z.pow(2).sum(-1) / var + self.n * torch.log(torch.tensor(2 * torch.pi * var,
                                                                                   dtype=z.dtype)))

    def _probes(self, z: Tensor, basis: Tensor, generator: torch.Generator | None) -> Tensor | None:
        if self.divergence == "exact":
            return None
        signs = torch.randint(0, 2, (self.n_probes, *z.shape), generator=generator).to(z.dtype) * 2 - 1
        return signs @ basis @ basis.T  # projected onto the subspace: E[v vᵀ] = Q Qᵀ

    def integrate(self, z: Tensor, log_p: Tensor, t_from: float, t_to: float,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """RK4 on ``(z, ℓ)`` with ``dz/dt = −½g²s``, ``dℓ/dt = −∇·f``, from t_from to t_to.

        Args:
            z: ``(B, dim)`` start points (projected to the subspace first).
            log_p: ``(B,)`` log density at the start (ℓ(t_from)).

        Returns:
            z and ℓ at t_to, detached.
        """
        z = self._project(z.detach())
        log_p = log_p.detach().to(z.dtype)
        basis = mean_free_basis(self.dim, self.particles, z.dtype).to(z.device)
        probes = self._probes(z, basis, generator)
        estimator = DIVERGENCES[self.divergence]
        h = (t_to - t_from) / self.steps

        def rhs(zs: Tensor, t: float) -> tuple[Tensor, Tensor]:
            g2 = self.schedule.g2(torch.tensor(t, dtype=zs.dtype, device=zs.device))

            def field(y: Tensor) -> Tensor:  # y may stack several copies of zs (the divergence's probes)
                return -0.5 * g2 * self.score(y, torch.full((len(y),), t, dtype=y.dtype, device=y.device))

            f, div = estimator(field, zs, basis, probes)
            return f, -div

        for k in range(self.steps):
            t = t_from + k * h
            f1, l1 = rhs(z, t)
            f2, l2 = rhs(z + 0.5 * h * f1, t + 0.5 * h)
            f3, l3 = rhs(z + 0.5 * h * f2, t + 0.5 * h)
            f4, l4 = rhs(z + h * f3, t + h)
            z = self._project(z + h / 6 * (f1 + 2 * f2 + 2 * f3 + f4))
            log_p = log_p + h / 6 * (l1 + 2 * l2 + 2 * l3 + l4)
        return z, log_p

    def _batch(self, rows: int) -> int:
        """Points per integration so that the stacked probes make at most ``rows`` rows."""
        return max(1, rows // (self.n if self.divergence == "exact" else self.n_probes))

    def log_prob(self, z0: Tensor, generator: torch.Generator | None = None, rows: int = 8192) -> Tensor:
        """log q(z₀) ``(B,)`` of data points z₀ ``(B, dim)`` (mean-free for particles);
        ``rows`` bounds the network's batch (points × probe vectors), i.e. the memory."""
        batch, out = self._batch(rows), []
        for start in range(0, len(z0), batch):
            z = z0[start:start + batch]
            z1, minus_log_det = self.integrate(z, torch.zeros(len(z), dtype=z.dtype), 0.0, 1.0, generator)
            # ℓ(1) − ℓ(0) = −∫∇·f, so log q(z₀) = log p₁(z₁) + ∫∇·f = log p₁(z₁) − ℓ(1).
            out.append(self.prior_log_prob(z1) - minus_log_det)
        return torch.cat(out)

    def sample(self, n: int, dtype: torch.dtype = torch.float64, generator: torch.Generator | None = None,
               rows: int = 8192) -> tuple[Tensor, Tensor]:
        """n samples z₀ ``(n, dim)`` by the ODE from the prior, with their log q ``(n,)``."""
        batch, zs, logs = self._batch(rows), [], []
        for start in range(0, n, batch):
            z1 = torch.randn((min(batch, n - start), self.dim), generator=generator, dtype=dtype)
            z1 = self._project(z1) * self.prior_std()
            z0, log_q = self.integrate(z1, self.prior_log_prob(z1), 1.0, 0.0, generator)
            zs.append(z0)
            logs.append(log_q)
        return torch.cat(zs), torch.cat(logs)
