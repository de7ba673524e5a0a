"""Reverse-KL training of a smooth flow on ℝ^D from the energy alone (method ``"reverse-kl"``).

Minimises KL(q_θ‖p) = E_q[log q_θ(x) + u(x)] + log Z over flow samples with the
reparameterisation gradient (:func:`~openmm_flowforce.flows.losses.reverse_kl_on_samples`;
Noé, Olsson, Köhler, Wu, Science 2019, arXiv 1812.01729, "training by energy"). The
samples come from the root-finding inverse of the smooth flow with implicit gradients
(Köhler, Krämer, Noé, arXiv 2110.00351), so the loss is differentiable in θ.

Reverse KL is mode seeking: on multimodal targets (GMM-40) it typically covers only some
modes; FAB (``"fab"``) is the mass-covering alternative. Each step evaluates the energy
at ``batch_size`` configurations (and its gradient, by backpropagation), all counted.

Energy regularisation (option ``energy_cut`` = c; the LJ presets set c = 100 kT, the
clusters' mean energies being −43 (LJ-13) and −326 (LJ-55) at kT = 1): the loss uses

    u_c(x) = u(x)                       for u ≤ c,
    u_c(x) = c + log(1 + u(x) − c)      for u > c,

continuous with a continuous first derivative at c (Noé et al. 2019 use this "linlogcut"
for the same reason). An untrained flow puts particles on top of each other, where
u ~ 10¹⁵ and its gradient dwarfs everything else; u_c keeps the push away from overlaps
but with a bounded scale. Only configurations the target gives weight < e^{-c} are
changed, so the minimiser is unchanged in practice; the logged ESS and log Z use the
true u. With an augmented flow (``flow: equivariant``) the loss energy is
u_c(x) − log π(a|x): cutting the whole joint energy instead lets the flow lower the loss
without bound by spreading x and a apart (measured on LJ-13: the loss fell without bound
and the samples flew apart), because above c the cut grows only like log u.

Logged per step: ``loss`` (E_q[log q + u] = KL − log Z), ``ess`` (Kish ESS fraction of the
batch's importance weights p/q) and ``log_z`` (log-mean-exp of those weights, an
estimate of log Z that is biased low for a poor flow).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..reweighting import effective_sample_size
from ..flows.losses import reverse_kl_on_samples
from .flow_training import COMMON_DEFAULTS, FlowSamplerMethod, TrainContext, _Recorder
from .registry import register_method


class _LastEnergy:
    """Energy callable that keeps the last energies it returned (for diagnostics)."""

    def __init__(self, energy):
        self.energy = energy
        self.last: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        u = self.energy(x)
        self.last = u.detach()
        return u


def regularised_energy(u: torch.Tensor, cut: float | None) -> torch.Tensor:
    """``u`` below ``cut``; ``cut + log(1 + u − cut)`` above it (C¹ at the cut); ``cut=None``: ``u``."""
    if cut is None:
        return u
    excess = torch.clamp(u - cut, min=0.0)
    return torch.where(u > cut, cut + torch.log1p(excess), u)


def cut_energy(energy: Callable[[Tensor], Tensor], cut: float | None,
               aux_energy: Callable[[Tensor], Tensor] | None = None) -> Callable[[Tensor], Tensor]:
    """The loss energy: u_c of the module docstring; for a flow with auxiliary variables,
    whose ``energy`` is the extended target's u(x) − log π(a|x) (``aux_energy`` = −log π),
    u_c(x) − log π(a|x): the cut acts on the target's energy only."""
    if aux_energy is None:
        return lambda x: regularised_energy(energy(x), cut)

    def joint(x: Tensor) -> Tensor:
        minus_log_aux = aux_energy(x)
        return regularised_energy(energy(x) - minus_log_aux, cut) + minus_log_aux

    return joint


class ReverseKLMethod(FlowSamplerMethod):
    """``"reverse-kl"``: a :class:`~openmm_flowforce.flows.RealFlow` trained by reverse KL.

    Options (None: the target's preset, see :mod:`~openmm_flowforce.samplers.flow_training`):
    ``scale``, ``n_layers``, ``hidden``, ``n_components``, ``transform``, ``mean_free``
    (flow); ``steps``, ``batch_size`` (flow samples = energy evaluations per step), ``lr``
    (Adam), ``grad_clip``, ``energy_cut`` (see the module docstring; None: the preset's,
    no cut where the preset has none), ``seed``, ``checkpoint_every``, ``log_every``.
    """

    name = "reverse-kl"
    defaults = dict(COMMON_DEFAULTS, energy_cut=None)

    def train_step(self, ctx: TrainContext) -> dict[str, float]:
        recorder, energy = _Recorder(ctx.model), _LastEnergy(ctx.energy)
        cut = ctx.options.get("energy_cut")
        loss = reverse_kl_on_samples(recorder, cut_energy(energy, cut, ctx.aux_energy), int(ctx.options["batch_size"]))
        updated = ctx.optimizer_step(loss)
        log_w = (-energy.last - recorder.log_q).double()
        log_w = torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf))
        finite = bool(torch.isfinite(log_w).any())
        return {"loss": float(loss.detach()),
                "ess": effective_sample_size(log_w) if finite else 0.0,
                "log_z": float(torch.logsumexp(log_w, 0) - math.log(len(log_w))) if finite else -math.inf,
                "skipped": float(not updated)}


register_method(ReverseKLMethod.name, ReverseKLMethod)
