"""One report of a trained energy-only sampler against reference samples.

:func:`evaluate_sampler` draws n samples from any registered method's model and compares
them with n reference samples using the metrics of :mod:`.metrics`, in the conventions of
the iDEM paper's tables (Akhound-Sadegh et al. 2024, arXiv 2402.06121):

* ``w2_unaligned`` — iDEM's "x-W2": W2 of the flat coordinates (mean-free for particle
  targets, both sets), no rotation or permutation alignment (their
  ``wasserstein(power=2)``: POT ``emd2`` on squared Euclidean costs, then sqrt).
* ``w2_aligned`` — the same after optimally aligning every pair by rotation/reflection
  and particle permutation (:func:`.metrics.aligned_cost_matrix`); particle targets only.
* ``w2_energy`` — W2 of the energies (the root); ``w2_energy_squared`` is what iDEM logs
  as ``energy_w2``. ``energy_mean_*`` and ``energy_median_*`` of the generated and the
  reference samples: on LJ a few overlapping configurations (u ~ 10¹⁵) decide the mean
  and the energy W2, the median shows where the bulk of the samples is.
* ``tv_distances`` — total variation of the interatomic-distance histograms, 200 bins on
  the reference's range (iDEM's ``dist_total_var``); particle targets only.
* ``nll`` (−mean log q on the reference) and ``ess`` (Kish, from
  ``log w = −u(x) − log q(x)`` on the model's samples) when the method has a density;
  None otherwise. Methods with ``sample_with_log_prob`` (iDEM's probability-flow ODE)
  take the ESS from a fresh batch of n samples drawn with their log q. Methods with
  ``sample_with_log_weights`` (SNF, CRAFT) take the ESS from
  their own path/SMC weights (a fresh batch of n) and add ``log_z`` (log-mean-exp of those
  weights); SNF's ``nll`` is its path estimate (an upper bound in expectation).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from .metrics import ess, tv_distance_histograms, w2_energy, w2_samples
from ..errors import BadFileError, FlowforceError
from ..io import bad_file, require_input_file

__all__ = ["evaluate_sampler", "load_reference"]


def load_reference(path: str, target: Any, n: int, seed: int = 0) -> np.ndarray:
    """n rows of a reference ``.npy`` ``(m, dim)``, drawn without replacement, made mean-free
    for particle targets.

    Raises:
        ValueError: unreadable file, wrong dimension, or fewer than n rows.
    """
    what, fix = f"a .npy array of reference samples (m, {target.dim})", "save one with numpy.save"
    path = require_input_file(path, what, fix)
    try:
        ref = np.load(path, allow_pickle=False)  # no pickled object arrays: they could run code
    except Exception as error:  # numpy raises several types for truncated or foreign files
        raise bad_file(path, what, error, fix) from None
    if not isinstance(ref, np.ndarray):
        ref.close()
        raise BadFileError(f"reference {path} is an .npz archive; expected {what} ({fix})")
    if not (np.issubdtype(ref.dtype, np.floating) or np.issubdtype(ref.dtype, np.integer)):
        raise BadFileError(f"reference {path} holds {ref.dtype} values; expected {what}")
    ref = np.asarray(ref, dtype=np.float64).reshape(len(ref), -1) if ref.ndim > 1 else ref
    if ref.ndim != 2 or ref.shape[1] != target.dim:
        raise BadFileError(f"reference {path} has shape {ref.shape}; the target needs (m, {target.dim})")
    if not np.isfinite(ref).all():
        raise BadFileError(f"reference {path} contains NaN or inf values; expected finite samples")
    if len(ref) < n:
        raise FlowforceError(f"reference {path} has {len(ref)} samples, fewer than the {n} asked for (-n)")
    ref = ref[np.random.default_rng(seed).choice(len(ref), n, replace=False)]
    shape = _particles(target)
    if shape is not None:
        p = ref.reshape(n, *shape)
        ref = (p - p.mean(axis=1, keepdims=True)).reshape(n, -1)
    return ref


def _particles(target: Any) -> tuple[int, int] | None:
    n, d = getattr(target, "n_particles", None), getattr(target, "spatial_dim", None)
    return (int(n), int(d)) if n is not None and d is not None else None


def evaluate_sampler(method: Any, model: torch.nn.Module, target: Any, reference: np.ndarray,
                     align: bool = True, seed: int = 0) -> dict[str, Any]:
    """Metrics of ``len(reference)`` model samples against ``reference`` ``(n, dim)``.

    Samples with a non-finite energy are kept for the coordinate metrics and counted in
    ``n_nonfinite_energy``; energy W2 uses the finite ones against as many reference
    energies (sorted-quantile matching needs equal counts, so the reference is truncated
    at random).

    Returns:
        A JSON-ready dict (see the module docstring for the keys), plus
        ``sampling_time_s`` and ``n``.
    """
    n = len(reference)
    shape = _particles(target)
    start = time.perf_counter()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # the caller's RNG is untouched
        torch.manual_seed(seed)
        x = method.sample(model, n).detach().to(torch.float64)
    sampling_time = time.perf_counter() - start
    if shape is not None:
        p = x.reshape(n, *shape)
        x = (p - p.mean(dim=1, keepdim=True)).reshape(n, -1)
    x_np = x.numpy()
    ref_t = torch.as_tensor(reference, dtype=torch.float64)
    with torch.no_grad():
        u_gen, u_ref = target.energy(x), target.energy(ref_t)
    finite = torch.isfinite(u_gen)
    report: dict[str, Any] = {"n": n, "sampling_time_s": sampling_time,
                              "n_nonfinite_energy": int((~finite).sum())}
    finite_x = np.isfinite(x_np).all(axis=1)
    report["w2_unaligned"] = w2_samples(x_np[finite_x], reference[:finite_x.sum()]) if finite_x.any() else None
    if shape is not None and align and finite_x.any():
        report["w2_aligned"] = w2_samples(x_np[finite_x], reference[:finite_x.sum()], align=True,
                                          n_particles=shape[0], spatial_dim=shape[1])
    else:
        report["w2_aligned"] = None
    if finite.any():
        keep = np.random.default_rng(seed).choice(n, int(finite.sum()), replace=False)
        e_w2 = w2_energy(u_gen[finite].numpy(), u_ref.numpy()[keep])
        report["w2_energy"], report["w2_energy_squared"] = e_w2, e_w2 ** 2
        report["energy_mean_generated"] = float(u_gen[finite].mean())
        # the median is not swamped by a few overlapping configurations (u ~ 10¹⁵ on LJ)
        report["energy_median_generated"] = float(u_gen[finite].median())
    else:
        report["w2_energy"] = report["w2_energy_squared"] = None
        report["energy_mean_generated"] = report["energy_median_generated"] = None
    report["energy_mean_reference"] = float(u_ref.mean())
    report["energy_median_reference"] = float(u_ref.median())
    report["tv_distances"] = None
    if shape is not None and finite_x.any():
        try:
            report["tv_distances"] = tv_distance_histograms(x_np[finite_x], reference, shape[0], shape[1],
                                                            edges_from="reference")
        except ValueError:
            # No generated distance inside the reference's range: the histograms are disjoint.
            report["tv_distances"] = 1.0
    parameter = next(model.parameters(), None)  # a method without a model (ESH) has none
    dtype = parameter.dtype if parameter is not None else torch.float64
    log_q_ref = method.log_prob(model, ref_t.to(dtype))
    if log_q_ref is None:
        report["nll"] = report["ess"] = None
    else:
        report["nll"] = float(-log_q_ref.detach().to(torch.float64).mean())
        with_log_prob = getattr(method, "sample_with_log_prob", None)
        if with_log_prob is not None:  # iDEM: the ODE gives samples and their log q in one pass
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 1)
                x_w, log_q_gen = (v.detach().to(torch.float64) for v in with_log_prob(model, n))
            with torch.no_grad():
                u_w = target.energy(x_w)
        else:
            x_w, u_w = x, u_gen
            log_q_gen = method.log_prob(model, x.to(dtype)).detach().to(torch.float64)
        log_w = -u_w - log_q_gen
        report["ess"] = ess(torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -torch.inf)))
    weighted = getattr(method, "sample_with_log_weights", None)
    if weighted is not None:  # path or SMC weights (SNF, CRAFT): the ESS of the samples' own weights
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            log_w = weighted(model, n)[1].detach().to(torch.float64)
        log_w = torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -torch.inf))
        finite_w = bool(torch.isfinite(log_w).any())
        report["ess"] = ess(log_w) if finite_w else 0.0
        report["log_z"] = float(torch.logsumexp(log_w, 0) - np.log(n)) if finite_w else None
    return report
