"""iDEM: Iterated Denoising Energy Matching (Akhound-Sadegh et al., ICML 2024, arXiv 2402.06121).

A variance-exploding diffusion sampler trained from the target's energy u(x) alone.

* Noise schedule (geometric, EDM's VE): ``σ²(t) = σ_min² (r^{2t} − 1)``, ``r = σ_max/σ_min``,
  ``g²(t) = dσ²/dt = 2 log r · σ_min² r^{2t}``, t ∈ [0, 1], so σ(1) ≈ σ_max.
* Target of the regression (:func:`estimate_noised_score`): the score of the noised
  Boltzmann density p_t = p ∗ N(0, σ_t²) by K-sample Monte Carlo,

  .. math::
      S_K(x_t, t) = ∇_{x_t} \\log \\frac1K \\sum_{i=1}^K \\exp(−u(x_t + σ_t ε_i))
                  = −\\sum_i w_i ∇u(x_t + σ_t ε_i),\\quad w = \\operatorname{softmax}(−u),

  from energies and forces only (a logsumexp, so no under/overflow); for particle targets
  ε is projected to mean-free noise. Estimated scores are clipped to a maximal norm,
  per particle for particle targets (as in the reference code's ``Clipper``).
* Inner loop (simulation-free): draw x₀ from a replay buffer, t ~ U(0, 1),
  x_t = x₀ + σ_t ε, regress the network s_θ(x_t, t) on S_K (squared error, optionally
  weighted by λ(t) = σ_t² + 10⁻³ as in their GMM config).
* Outer loop: every ``steps_per_outer`` regression steps, integrate the reverse SDE
  ``dx = −g²(t) s_θ(x, t) dt + η g(t) dW̄`` from t = 1 to 0 (Euler–Maruyama, ``η`` =
  ``diffusion_scale``) from the prior N(0, σ²(1)) and push the samples into the buffer.
  The buffer starts with prior samples (their ``init_from_prior``).

Targets in coordinates of very different scale (GMM-40 spans ±40) are diffused in
``x/data_scale`` (their ``data_normalization_factor`` = 50 for GMM), the energy being
evaluated at ``data_scale·z``.

Differences from the reference code (jarridrb/DEM), on purpose: the defaults here are
scaled down so a CPU run takes minutes (K, batch, integration steps, widths: see
:data:`PAPER_SETTINGS` for theirs); the learning rate is constant (they use
ReduceLROnPlateau on a validation loss); the buffer is initialised from the prior for
every target (their GMM run starts from an SDE driven by the MC estimator itself).
Density: :meth:`IDEM.log_prob` is the log density of the score model's probability-flow
ODE (:mod:`.pf_ode`, exact or Hutchinson divergence), and :meth:`IDEM.sample_with_log_prob`
draws samples by that ODE with their log q, so the sampler report has NLL and ESS for
iDEM (the paper's NLL/ESS come from a separate flow-matching model fit to the buffer).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..engine import Engine, StateOf
from ..nn.egnn import EGNN
from ..nn.mlp import MLP
from .pf_ode import ProbabilityFlow, subspace_dimension
from .common import SAMPLER_CHECKPOINT_FORMAT, check_method, particle_shape, sampler_fingerprint, target_spec
from .registry import SamplerMethod, register_method
from ..errors import FlowforceError

Tensor = torch.Tensor
Energy = Callable[[Tensor], Tensor]

__all__ = ["GeometricNoiseSchedule", "IDEM", "IDEMModel", "PAPER_SETTINGS", "ReplayBuffer", "clip_score_norm",
           "estimate_noised_score"]


class GeometricNoiseSchedule:
    """VE schedule with geometric σ: ``σ²(t) = σ_min²(r^{2t} − 1)``, ``r = σ_max/σ_min``
    (Karras et al. 2022, arXiv 2206.00364, eqs. 192–199; iDEM's ``GeometricNoiseSchedule``).

    ``variance(t)`` is the variance added between 0 and t, ``g2(t) = dσ²/dt`` the squared
    diffusion coefficient of the forward SDE ``dx = g(t) dW``.
    """

    def __init__(self, sigma_min: float, sigma_max: float):
        if not 0 < sigma_min < sigma_max:
            raise FlowforceError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_r = math.log(self.sigma_max / self.sigma_min)

    def variance(self, t: Tensor) -> Tensor:
        return self.sigma_min ** 2 * torch.expm1(2.0 * t * self._log_r)

    def sigma(self, t: Tensor) -> Tensor:
        return self.variance(t).sqrt()

    def g2(self, t: Tensor) -> Tensor:
        return 2.0 * self._log_r * self.sigma_min ** 2 * torch.exp(2.0 * t * self._log_r)


def _remove_mean(x: Tensor, particles: tuple[int, int] | None) -> Tensor:
    if particles is None:
        return x
    p = x.reshape(*x.shape[:-1], *particles)
    return (p - p.mean(dim=-2, keepdim=True)).reshape(x.shape)


def clip_score_norm(score: Tensor, max_norm: float | None, particles: tuple[int, int] | None = None) -> Tensor:
    """Scale rows (or, for particle systems, each particle's d-vector) down to norm ≤ max_norm.

    Args:
        score: ``(B, dim)``.
        max_norm: the bound; None leaves the scores as they are.
        particles: ``(N, d)`` to clip per particle.
    """
    if max_norm is None:
        return score
    v = score if particles is None else score.reshape(score.shape[0], *particles)
    norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    v = v * torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return v.reshape(score.shape)


def estimate_noised_score(energy: Energy, x: Tensor, sigma: Tensor, n_mc: int,
                          particles: tuple[int, int] | None = None, generator: torch.Generator | None = None,
                          max_evaluations: int = 2 ** 18) -> Tensor:
    """K-sample Monte Carlo estimate of the score of the noised target, ``S_K(x, σ)``.

    .. math::
        S_K(x, σ) = ∇_x \\log \\sum_{i=1}^K e^{−u(x + σ ε_i)} = −\\sum_i w_i\\, ∇u(x + σ ε_i),
        \\qquad w = \\operatorname{softmax}_i(−u(x + σ ε_i)),

    with ε_i ~ N(0, I) (mean-free over particles when ``particles`` is given). Noised
    points whose energy or gradient is not finite get weight 0; a point with no finite
    sample gets score 0. S_K is a consistent, biased (ratio) estimator of ∇ log p_σ(x);
    it is exact for K → ∞. Costs ``K·B`` energy (and gradient) evaluations.

    Args:
        energy: ``u(y)`` for flat ``y`` of shape ``(M, dim)`` → ``(M,)``, differentiable.
        x: ``(B, dim)`` points; sigma: ``(B,)`` noise levels (standard deviations).
        n_mc: K.
        max_evaluations: energies evaluated per call of ``energy`` (memory bound).

    Returns:
        ``(B, dim)`` estimated scores, detached, in x's dtype.
    """
    b, dim = x.shape
    chunk = max(1, max_evaluations // n_mc)
    out = torch.empty_like(x)
    for start in range(0, b, chunk):
        xs, ss = x[start:start + chunk].detach(), sigma[start:start + chunk].detach()
        eps = torch.randn((n_mc, *xs.shape), generator=generator, dtype=x.dtype, device=x.device)
        eps = _remove_mean(eps, particles)
        y = (xs[None] + ss[None, :, None] * eps).reshape(-1, dim).requires_grad_(True)
        with torch.enable_grad():
            u = energy(y)
            (grad_u,) = torch.autograd.grad(u.sum(), y)
        u = u.detach().reshape(n_mc, -1)
        grad_u = grad_u.reshape(n_mc, -1, dim)
        finite = torch.isfinite(u) & torch.isfinite(grad_u).all(-1)
        log_w = torch.where(finite, -u, torch.full_like(u, -math.inf))
        w = torch.softmax(log_w, dim=0)
        w = torch.where(torch.isfinite(w), w, torch.zeros_like(w))   # all-(−inf) columns give NaN
        grad_u = torch.where(finite[..., None], grad_u, torch.zeros_like(grad_u))
        out[start:start + chunk] = -(w[..., None] * grad_u).sum(0)
    return out


def _sinusoidal(t: Tensor, n_frequencies: int) -> Tensor:
    """``(B,)`` → ``(B, 2F)`` features sin/cos(2^k π t), k < F."""
    freqs = math.pi * 2.0 ** torch.arange(n_frequencies, dtype=t.dtype, device=t.device)
    angle = t[:, None] * freqs
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


class _TimeMLP(nn.Module):
    """Score MLP for vector targets: ``s(x, t) = MLP([x, t, sin/cos features of t])``."""

    def __init__(self, dim: int, hidden: int, n_layers: int, n_frequencies: int = 8):
        super().__init__()
        self.n_frequencies = n_frequencies
        self.mlp = MLP(dim + 1 + 2 * n_frequencies, dim, hidden=[hidden] * n_layers, activation="silu")

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.mlp(torch.cat([x, t[:, None], _sinusoidal(t, self.n_frequencies)], dim=-1))


class _TimeEGNN(nn.Module):
    """EGNN score conditioned on t (node features: t, as iDEM's EGNN_dynamics)."""

    def __init__(self, particles: tuple[int, int], hidden: int, n_layers: int):
        super().__init__()
        self.egnn = EGNN(particles[0], particles[1], n_conditions=1, hidden=hidden, n_layers=n_layers)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.egnn(x, t[:, None])


class IDEMModel(nn.Module):
    """The iDEM sampler: a score network s_θ(z, t) plus its noise schedule.

    Coordinates: the network works in ``z = x / data_scale``; :meth:`sample` returns x
    (the target's coordinates), flat ``(n, dim)``.

    Args:
        dim: flat dimension of the target.
        particles: ``(N, d)`` for particle targets (EGNN, mean-free), None otherwise (MLP).
        network: "egnn" or "mlp".
        hidden, n_layers: network size.
        sigma_min, sigma_max: geometric schedule (in z units).
        data_scale: x = data_scale · z.
        diffusion_scale: η, the noise factor of the reverse SDE.
        integration_steps: Euler–Maruyama steps of the reverse SDE.
        ode_steps, divergence, n_probes: the probability-flow ODE of :meth:`flow` (RK4
            steps, "exact" or "hutchinson" divergence, Hutchinson probes).
        ema: keep an exponential moving average of the score network's weights (updated
            by :meth:`update_ema`); in eval mode the score (sampling, the ODE) uses it.
    """

    def __init__(self, dim: int, particles: tuple[int, int] | None, network: str, hidden: int, n_layers: int,
                 sigma_min: float, sigma_max: float, data_scale: float = 1.0, diffusion_scale: float = 1.0,
                 integration_steps: int = 200, ode_steps: int = 100, divergence: str = "exact",
                 n_probes: int = 1, ema: bool = False):
        super().__init__()
        self.dim, self.particles = int(dim), particles
        self.schedule = GeometricNoiseSchedule(sigma_min, sigma_max)
        self.data_scale, self.diffusion_scale = float(data_scale), float(diffusion_scale)
        self.integration_steps = int(integration_steps)
        self.ode_steps, self.divergence, self.n_probes = int(ode_steps), str(divergence), int(n_probes)
        if network == "egnn":
            if particles is None:
                raise FlowforceError("network 'egnn' needs a particle target (with n_particles and spatial_dim)")
            self.net = _TimeEGNN(particles, hidden, n_layers)
        elif network == "mlp":
            self.net = _TimeMLP(dim, hidden, n_layers)
        else:
            raise FlowforceError(f"unknown network {network!r}; valid: egnn, mlp")
        # A frozen copy, saved with the model (so checkpoints and resume keep it).
        self.ema_net = copy.deepcopy(self.net).requires_grad_(False) if ema else None

    def score(self, z: Tensor, t: Tensor) -> Tensor:
        """s_θ(z, t) ≈ ∇_z log p_t(z), ``(B, dim)`` (the averaged weights in eval mode, if kept)."""
        net = self.ema_net if self.ema_net is not None and not self.training else self.net
        return net(z, t)

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        """θ_ema ← decay·θ_ema + (1 − decay)·θ (no-op without an average)."""
        if self.ema_net is None:
            return
        for averaged, current in zip(self.ema_net.parameters(), self.net.parameters()):
            averaged.lerp_(current, 1.0 - decay)

    def prior_sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws of N(0, σ²(1) I) in z units (mean-free for particles)."""
        dtype = next(self.parameters()).dtype
        z = torch.randn((n, self.dim), generator=generator, dtype=dtype) * self.schedule.sigma(torch.tensor(1.0))
        return _remove_mean(z, self.particles)

    @torch.no_grad()
    def sample_z(self, n: int, generator: torch.Generator | None = None, steps: int | None = None,
                 batch: int = 1000) -> Tensor:
        """Integrate the reverse SDE from t = 1 to 0; returns z ``(n, dim)``."""
        steps = int(steps or self.integration_steps)
        out = []
        for start in range(0, n, batch):
            z = self.prior_sample(min(batch, n - start), generator)
            dt = 1.0 / steps
            for k in range(steps, 0, -1):
                t = torch.full((len(z),), k * dt, dtype=z.dtype)
                g2 = self.schedule.g2(t)[:, None]
                noise = torch.randn(z.shape, generator=generator, dtype=z.dtype)
                z = z + g2 * self.score(z, t) * dt + self.diffusion_scale * (g2 * dt).sqrt() * noise
                z = _remove_mean(z, self.particles)
            out.append(z)
        return torch.cat(out)

    def sample(self, n: int, generator: torch.Generator | None = None, steps: int | None = None) -> Tensor:
        """n samples in the target's coordinates, ``(n, dim)``."""
        return self.sample_z(n, generator, steps) * self.data_scale

    def flow(self) -> ProbabilityFlow:
        """The probability-flow ODE of s_θ (in z units)."""
        return ProbabilityFlow(self.score, self.schedule, self.dim, self.particles, self.ode_steps,
                               self.divergence, self.n_probes)

    def log_prob(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """log q(x) ``(B,)`` of the probability-flow ODE at x ``(B, dim)`` (target coordinates,
        made mean-free for particles; a density on the zero-CoM subspace then, of dimension
        ``(N − 1)·d``): ``log q_z(x/s) − n·log s`` for ``data_scale`` s."""
        dtype = next(self.parameters()).dtype
        z = x.detach().to(dtype) / self.data_scale
        n = subspace_dimension(self.dim, self.particles)
        return self.flow().log_prob(z, generator) - n * math.log(self.data_scale)

    def sample_with_log_prob(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n samples ``(n, dim)`` by the probability-flow ODE from the prior, with log q ``(n,)``."""
        dtype = next(self.parameters()).dtype
        z, log_q = self.flow().sample(n, dtype, generator)
        return z * self.data_scale, log_q - subspace_dimension(self.dim, self.particles) * math.log(self.data_scale)


class ReplayBuffer:
    """Fixed-capacity FIFO of z samples, sampled uniformly with replacement."""

    def __init__(self, dim: int, capacity: int, dtype: torch.dtype = torch.float32):
        self.capacity = int(capacity)
        self.data = torch.zeros((0, dim), dtype=dtype)

    def __len__(self) -> int:
        return len(self.data)

    def add(self, z: Tensor) -> None:
        self.data = torch.cat([self.data, z.detach().to(self.data.dtype)])[-self.capacity:]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.data[torch.randint(len(self.data), (n,), generator=generator)]


#: The reference code's settings (jarridrb/DEM configs/experiment/*_idem.yaml and
#: configs/model/dem.yaml): 1000 epochs × 100 regression steps, 1000 new samples per epoch.
PAPER_SETTINGS: dict[str, dict[str, Any]] = {
    "gmm40": dict(network="mlp", hidden=128, n_layers=3, sigma_min=1e-5, sigma_max=1.0, n_mc=500,
                  max_score_norm=70.0, weighting="variance", lr=5e-4, batch=512, buffer_size=10000,
                  n_generate=1000, integration_steps=1000, diffusion_scale=1.0, data_scale=50.0, steps=100000,
                  steps_per_outer=100),
    "dw4": dict(network="egnn", hidden=128, n_layers=3, sigma_min=1e-5, sigma_max=3.0, n_mc=1000,
                max_score_norm=20.0, weighting="none", lr=1e-3, batch=512, buffer_size=10000, n_generate=1000,
                integration_steps=1000, diffusion_scale=1.0, data_scale=1.0, steps=100000, steps_per_outer=100),
    "lj13": dict(network="egnn", hidden=128, n_layers=5, sigma_min=0.01, sigma_max=2.0, n_mc=1000,
                 max_score_norm=20.0, weighting="none", lr=1e-3, batch=512, buffer_size=10000, n_generate=1000,
                 integration_steps=1000, diffusion_scale=0.9, data_scale=1.0, steps=100000, steps_per_outer=100),
    "lj55": dict(network="egnn", hidden=128, n_layers=5, sigma_min=0.5, sigma_max=4.0, n_mc=1000,
                 max_score_norm=20.0, weighting="none", lr=1e-3, batch=128, buffer_size=10000, n_generate=128,
                 integration_steps=1000, diffusion_scale=0.5, data_scale=1.0, steps=200000, steps_per_outer=100),
}

#: CPU-scale defaults per target kind (what ``None`` options resolve to). Same schedule,
#: clipping and weighting as the paper; smaller K, batch, networks, SDE steps. DW-4 differs
#: more (BENCHMARKS.md, "iDEM at the CPU default"): σ_min = 0.01 instead of 10⁻⁵ puts 31 %
#: rather than 14 % of the uniform t draws (and SDE steps) at σ > 0.5, where the K-sample
#: target is mostly noise and needs the most averaging; a 2000-sample buffer holds the
#: last 4 refills instead of every sample since the prior; sampling uses an EMA (0.99) of
#: the score weights.
CPU_SETTINGS: dict[str, dict[str, Any]] = {
    "gmm40": dict(PAPER_SETTINGS["gmm40"], n_mc=500, batch=256, n_generate=500, integration_steps=200,
                  steps=2000, steps_per_outer=100, ema=0.0),
    "dw4": dict(PAPER_SETTINGS["dw4"], hidden=64, n_mc=200, batch=128, n_generate=500, integration_steps=200,
                steps=2000, steps_per_outer=100, sigma_min=0.01, buffer_size=2000, ema=0.99),
    "lj13": dict(PAPER_SETTINGS["lj13"], hidden=32, n_layers=3, n_mc=100, batch=64, n_generate=256,
                 integration_steps=100, steps=2000, steps_per_outer=200, ema=0.0),
    "lj55": dict(PAPER_SETTINGS["lj55"], hidden=32, n_layers=3, n_mc=50, batch=16, n_generate=32,
                 integration_steps=100, steps=1000, steps_per_outer=200, ema=0.0),
}


def _target_kind(target: Any) -> str:
    """Which row of :data:`CPU_SETTINGS` a target uses (by type and size, not by name)."""
    from ..targets.toys import GaussianMixture40, LennardJonesCluster, MultiDoubleWell

    if isinstance(target, GaussianMixture40):
        return "gmm40"
    if isinstance(target, MultiDoubleWell):
        return "dw4"
    if isinstance(target, LennardJonesCluster):
        return "lj55" if target.n_particles >= 30 else "lj13"
    # Anything else: vector targets get the GMM-style MLP, particle targets LJ-13's.
    return "lj13" if particle_shape(target) is not None else "gmm40"


class IDEM(SamplerMethod):
    """iDEM as a :class:`SamplerMethod` (registered as ``"idem"``).

    Options (``None`` = the per-target default of :data:`CPU_SETTINGS`):
    ``network`` ("egnn"/"mlp"), ``hidden``, ``n_layers``, ``sigma_min``, ``sigma_max``,
    ``n_mc`` (K), ``max_score_norm``, ``weighting`` ("none" or "variance"), ``lr``,
    ``batch`` (regression points per step), ``buffer_size``, ``n_init`` (prior samples
    first put in the buffer), ``n_generate`` (SDE samples per outer iteration),
    ``integration_steps``, ``diffusion_scale``, ``data_scale``, ``steps`` (total
    regression steps), ``steps_per_outer``, ``grad_clip`` (gradient-norm clip, 0.5 as
    Lightning's ``gradient_clip_val`` in their trainer), ``ema`` (decay of the moving
    average of the score weights used for sampling; 0 = none), ``seed``, ``checkpoint_every``,
    ``log_every``; for the probability-flow likelihood (evaluation only, may change on
    resume): ``ode_steps`` (RK4 steps), ``divergence`` ("exact", n backward passes per
    evaluation, or "hutchinson"), ``n_probes`` (Hutchinson probes).
    """

    name = "idem"
    defaults: Mapping[str, Any] = {
        "network": None, "hidden": None, "n_layers": None, "sigma_min": None, "sigma_max": None, "n_mc": None,
        "max_score_norm": None, "weighting": None, "lr": None, "batch": None, "buffer_size": None,
        "n_init": 1024, "n_generate": None, "integration_steps": None, "diffusion_scale": None,
        "data_scale": None, "steps": None, "steps_per_outer": None, "grad_clip": 0.5, "seed": 0,
        "checkpoint_every": 500, "log_every": 10, "ode_steps": 100, "divergence": "exact", "n_probes": 1,
        "ema": None,
    }

    def resolve(self, target: Any, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """Validated options with every None filled from the target's row of CPU_SETTINGS."""
        opts = self.options(options)
        row = CPU_SETTINGS[_target_kind(target)]
        opts = {k: (row[k] if v is None and k in row else v) for k, v in opts.items()}
        if opts["weighting"] not in ("none", "variance"):
            raise FlowforceError(f"unknown weighting {opts['weighting']!r}; valid: none, variance")
        for key in ("n_mc", "batch", "buffer_size", "n_generate", "integration_steps", "steps", "steps_per_outer",
                    "checkpoint_every", "log_every", "n_init"):
            if isinstance(opts[key], bool) or not isinstance(opts[key], int) or opts[key] < 1:
                raise FlowforceError(f"option {key} must be a positive integer, got {opts[key]!r}")
        return opts

    def build(self, target: Any, options: Mapping[str, Any]) -> IDEMModel:
        opts = self.resolve(target, options)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(opts["seed"]))
            return IDEMModel(target.dim, particle_shape(target), opts["network"], int(opts["hidden"]),
                             int(opts["n_layers"]), opts["sigma_min"], opts["sigma_max"], opts["data_scale"],
                             opts["diffusion_scale"], opts["integration_steps"], opts["ode_steps"],
                             opts["divergence"], opts["n_probes"], ema=opts["ema"] > 0)

    def sample(self, model: IDEMModel, n: int, generator: torch.Generator | None = None) -> Tensor:
        return model.sample(n, generator)

    def log_prob(self, model: IDEMModel, x: Tensor) -> Tensor:
        """log q of the probability-flow ODE (see :meth:`IDEMModel.log_prob`)."""
        return model.log_prob(x).detach()

    def sample_with_log_prob(self, model: IDEMModel, n: int) -> tuple[Tensor, Tensor]:
        """Samples drawn by the probability-flow ODE with their log q (for importance weights)."""
        return model.sample_with_log_prob(n)

    def train(self, model: IDEMModel, target: Any, options: Mapping[str, Any], checkpoint: str | Path,
              progress: bool = True, log_path: str | Path | None = None) -> dict[str, Any]:
        """Run (or resume, when ``checkpoint`` exists) iDEM up to ``options["steps"]`` steps.

        Returns the summary ``{"steps", "energy_evaluations", "wall_time_s", "resumed_from",
        "final_loss"}``; the checkpoint is written atomically every ``checkpoint_every``
        steps and at the end, with model, optimizer, buffer and generator state, so a
        resumed run continues exactly as an uninterrupted one.
        """
        return _Trainer(self, model, target, self.resolve(target, options), Path(checkpoint), progress,
                        log_path).run()


class _Trainer:
    """One iDEM training run: its state and step; the loop is the engine's."""

    def __init__(self, method: IDEM, model: IDEMModel, target: Any, opts: dict[str, Any], checkpoint: Path,
                 progress: bool, log_path: str | Path | None):
        self.method, self.model, self.target, self.opts = method, model, target, opts
        self.particles = particle_shape(target)
        self.dtype = next(model.parameters()).dtype
        self.optimizer = torch.optim.Adam(model.parameters(), lr=opts["lr"])
        self.generator = torch.Generator().manual_seed(int(opts["seed"]))
        self.buffer = ReplayBuffer(model.dim, opts["buffer_size"], self.dtype)
        self.energy_evaluations = 0
        self.last_loss = math.nan
        self.last_generated_energy = math.nan
        self.engine = Engine(
            model, self.step, opts["steps"], optimizer=self.optimizer, checkpoint=checkpoint,
            checkpoint_every=opts["checkpoint_every"], fmt=SAMPLER_CHECKPOINT_FORMAT,
            payload=lambda: {"format": SAMPLER_CHECKPOINT_FORMAT, "method": method.name,
                             "target": target_spec(target), "options": dict(opts), "summary": self.summary()},
            fingerprint=sampler_fingerprint(target, opts), check=check_method(method.name),
            state={"idem": StateOf(self._state, self._load_state)}, generators={"idem": self.generator},
            log_path=log_path, log_every=opts["log_every"],
            log_extra=lambda: {"energy_evaluations": self.energy_evaluations,
                               "generated_energy_median": self.last_generated_energy,
                               "buffer_size": len(self.buffer)},
            progress="idem" if progress else None, seed=int(opts["seed"]))

    # -- energy in z units, counted ------------------------------------------------------------
    def energy_z(self, z: Tensor) -> Tensor:
        self.energy_evaluations += z.shape[0]
        return self.target.energy(z * self.model.data_scale)

    # -- checkpoints ----------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        return {"steps": self.engine.step, "energy_evaluations": self.energy_evaluations,
                "wall_time_s": self.engine.elapsed(), "final_loss": self.last_loss}

    def _state(self) -> dict[str, Any]:
        return {"buffer": self.buffer.data.clone(), "energy_evaluations": self.energy_evaluations,
                "last_loss": self.last_loss, "last_generated_energy": self.last_generated_energy}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.buffer.data = state["buffer"].to(self.dtype)
        self.energy_evaluations = int(state["energy_evaluations"])
        self.last_loss = float(state["last_loss"])
        self.last_generated_energy = float(state["last_generated_energy"])

    # -- the algorithm --------------------------------------------------------------------------
    def refill_buffer(self) -> None:
        """Outer loop: samples from the current model's reverse SDE into the buffer."""
        self.model.eval()
        z = self.model.sample_z(self.opts["n_generate"], self.generator)
        self.model.train()
        with torch.no_grad():
            u = self.energy_z(z)
        finite = torch.isfinite(u)
        self.last_generated_energy = float(u[finite].median()) if finite.any() else math.nan
        self.buffer.add(z[finite])

    def regression_step(self) -> float:
        """Inner loop: one DEM regression step on buffer points noised at random t."""
        opts, schedule = self.opts, self.model.schedule
        z0 = self.buffer.sample(opts["batch"], self.generator)
        t = torch.rand((opts["batch"],), generator=self.generator, dtype=self.dtype)
        sigma = schedule.sigma(t)
        noise = _remove_mean(torch.randn(z0.shape, generator=self.generator, dtype=self.dtype), self.particles)
        zt = z0 + sigma[:, None] * noise
        target = estimate_noised_score(self.energy_z, zt, sigma, opts["n_mc"], self.particles, self.generator)
        target = clip_score_norm(target, opts["max_score_norm"], self.particles)
        error = (self.model.score(zt, t) - target).pow(2).mean(-1)
        if opts["weighting"] == "variance":
            error = error * (schedule.variance(t) + 1e-3)
        loss = error.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if opts["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), opts["grad_clip"])
        self.optimizer.step()
        self.model.update_ema(opts["ema"])
        return float(loss.detach())

    def step(self) -> dict[str, float]:
        """One engine step: an outer iteration every ``steps_per_outer`` steps, then a regression step."""
        if self.engine.step > 0 and self.engine.step % self.opts["steps_per_outer"] == 0:
            self.refill_buffer()
        self.last_loss = self.regression_step()
        return {"dem": self.last_loss}

    def run(self) -> dict[str, Any]:
        if self.engine.resume() is None:
            self.buffer.add(self.model.prior_sample(self.opts["n_init"], self.generator))
        self.engine.run()
        return {**self.summary(), "resumed_from": self.engine.resumed_from}


register_method("idem", IDEM)
