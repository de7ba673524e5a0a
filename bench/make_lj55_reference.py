"""LJ-55 reference samples by long Metropolis-adjusted Langevin (MALA) runs.

    python bench/make_lj55_reference.py                # long run (≈ 35 min on 1 CPU core)
    python bench/make_lj55_reference.py --quick        # < 2 min smoke run, small output
    python bench/make_lj55_reference.py --chains 512 --burn-in 20000 --steps 40000 \\
        --thin 200 --device cuda --out lj55_reference.npy

Target: ``get_target("lj55")``, u(x) = 2·Σ_{i<j}[r⁻¹² − 2r⁻⁶] + ½·Σ_i|x_i − x̄|² at kT = 1
(see :class:`openmm_flowforce.targets.toys.LennardJonesCluster`).

Sampler. Many independent chains, each a MALA chain on the mean-free subspace
V = {x : Σ_i x_i = 0} (u is translation invariant, so ∇u ∈ V):

    x' = x − ε ∇u(x) + sqrt(2ε) · P ξ,     ξ ~ N(0, I),  P = remove the centre of mass,
    accept with min(1, exp(−u(x') + u(x) − |x − x' + ε∇u(x')|²/(4ε) + |x' − x + ε∇u(x)|²/(4ε))).

The proposal is an isotropic Gaussian on V, so the Metropolis–Hastings ratio above is
exact on V and the chain leaves exp(−u) restricted to V invariant. Each chain's step size
ε is adapted during burn-in only (Robbins–Monro on log ε towards 57.4% acceptance, the
MALA optimum) and then frozen, so the production kernel is a fixed reversible kernel.
Chains start from random 55-site subsets of a simple cubic grid (spacing 1.1); the
burn-in washes that out. After burn-in every ``thin``-th state of every chain is kept.

Equipartition check. For p ∝ exp(−u) on V (dimension D' = (N − 1)·d = 162), integration
by parts gives E[y·∇u(y)] = D'·kT (the trap makes the boundary terms vanish). Because u
is translation invariant, x·∇u is the same for x and its centred copy. Hence

    ⟨½ x·∇u⟩ = (N − 1)·d / 2 = 81     (not N·d/2 = 82.5: the centre of mass is not sampled).

x·∇u is the virial: 2·Σ_{i<j} r_ij·V'(r_ij) (× r/r_soft for the 10⁻⁶ softening) plus
Σ_i |x_i − x̄|² from the trap. The script prints its mean with a standard error from the
spread of the per-chain means (chains are independent), plus the mean energy.

The output is written atomically: ``(n_samples, 165)`` float32, mean-free. The script
also prints the drift of the mean energy between the two halves of production; from the
grid start the energy is still falling after ~6000 steps (64 chains, ε ≈ 2·10⁻⁴), so
burn-in must be long — if the drift or the equipartition test fails, run longer.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

Tensor = torch.Tensor

#: MALA's asymptotically optimal acceptance rate (Roberts & Rosenthal 1998).
TARGET_ACCEPTANCE = 0.574


def energy_and_grad(target, x: Tensor) -> tuple[Tensor, Tensor]:
    """u(x) ``(C,)`` and ∇u(x) ``(C, dim)``; non-finite values are left as they are."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        u = target.energy(x)
        (grad,) = torch.autograd.grad(u.sum(), x)
    return u.detach(), grad


def mala_step(target, x: Tensor, u: Tensor, grad: Tensor, step: Tensor, generator: torch.Generator | None,
              project: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One MALA step for every chain.

    Args:
        x, u, grad: current states ``(C, dim)``, energies ``(C,)``, gradients ``(C, dim)``.
        step: per-chain step sizes ε ``(C,)``.
        project: linear projection onto the subspace the chain lives on (e.g.
            ``target.remove_mean``), applied to the noise; None for all of ℝ^dim.

    Returns:
        ``(x, u, grad, acceptance_probability)`` after the step.
    """
    eps = step[:, None]
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if project is not None:
        noise = project(noise)
    proposal = x - eps * grad + torch.sqrt(2 * eps) * noise
    if project is not None:
        proposal = project(proposal)  # only removes round-off drift: x, grad and noise are in V
    u_new, grad_new = energy_and_grad(target, proposal)
    forward = (proposal - x + eps * grad).pow(2).sum(-1)
    backward = (x - proposal + eps * grad_new).pow(2).sum(-1)
    log_alpha = u - u_new - (backward - forward) / (4 * step)
    finite = torch.isfinite(log_alpha) & torch.isfinite(grad_new).all(-1)
    log_alpha = torch.where(finite, log_alpha, torch.full_like(log_alpha, -math.inf))
    log_uniform = torch.log(torch.rand(u.shape, generator=generator, dtype=x.dtype, device=x.device))
    accept = log_uniform < log_alpha
    x = torch.where(accept[:, None], proposal, x)
    u = torch.where(accept, u_new, u)
    grad = torch.where(accept[:, None], grad_new, grad)
    return x, u, grad, log_alpha.clamp(max=0.0).exp()


def run_mala(target, x0: Tensor, n_burn_in: int, n_steps: int, thin: int, step0: float = 1e-3,
             adapt_rate: float = 0.05, generator: torch.Generator | None = None,
             progress: bool = True) -> dict:
    """Burn in (adapting per-chain step sizes), then sample with frozen step sizes.

    Args:
        x0: starting states ``(C, dim)``; they are centred first.
        n_burn_in: adapting steps (not kept). n_steps: production steps; every ``thin``-th
            state of every chain is kept.

    Returns:
        dict with ``samples`` ``(C, n_steps // thin, dim)``, ``energies`` ``(C, n_kept)``,
        ``step`` ``(C,)``, ``acceptance`` (mean over production steps and chains).
    """
    project = target.remove_mean
    x = project(x0.detach().clone())
    u, grad = energy_and_grad(target, x)
    log_step = torch.full(u.shape, math.log(step0), dtype=x.dtype, device=x.device)
    bar = _progress(n_burn_in + n_steps, progress)
    for _ in range(n_burn_in):
        x, u, grad, prob = mala_step(target, x, u, grad, log_step.exp(), generator, project)
        log_step = log_step + adapt_rate * (prob - TARGET_ACCEPTANCE)
        bar.update(1)
    step = log_step.exp()
    samples, energies, accepted = [], [], 0.0
    for i in range(1, n_steps + 1):
        x, u, grad, prob = mala_step(target, x, u, grad, step, generator, project)
        accepted += float(prob.mean())
        if i % thin == 0:
            samples.append(x.clone())
            energies.append(u.clone())
        bar.update(1)
    bar.close()
    if not samples:
        raise ValueError(f"no samples kept: n_steps={n_steps} < thin={thin}")
    return {"samples": torch.stack(samples, dim=1), "energies": torch.stack(energies, dim=1), "step": step,
            "acceptance": accepted / max(n_steps, 1)}


def equipartition(target, samples: Tensor) -> dict:
    """⟨½ x·∇u⟩ with its standard error over chains, and the value (N − 1)·d/2 it should have.

    Args:
        samples: ``(C, S, dim)`` — C independent chains of S samples each (C ≥ 2), or
            ``(S, dim)`` treated as S independent samples.
    """
    if samples.dim() == 2:
        samples = samples[:, None]
    c, s, dim = samples.shape
    flat = samples.reshape(c * s, dim)
    _, grad = energy_and_grad(target, flat)
    half_virial = 0.5 * (target.remove_mean(flat) * grad).sum(-1).reshape(c, s)
    chain_means = half_virial.mean(1)
    return {"mean": float(chain_means.mean()), "standard_error": float(chain_means.std() / math.sqrt(c)),
            "expected": (target.n_particles - 1) * target.spatial_dim / 2}


def grid_start(n_chains: int, n_particles: int, spatial_dim: int = 3, spacing: float = 1.1,
               generator: torch.Generator | None = None, dtype=torch.float64) -> Tensor:
    """Each chain: a random ``n_particles``-subset of the smallest cubic grid that holds them."""
    side = math.ceil(n_particles ** (1 / spatial_dim))
    axes = [torch.arange(side, dtype=dtype)] * spatial_dim
    sites = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, spatial_dim) * spacing
    picks = torch.stack([torch.randperm(len(sites), generator=generator)[:n_particles] for _ in range(n_chains)])
    return sites[picks].reshape(n_chains, n_particles * spatial_dim)


def _progress(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency of the package; fall back quietly anyway
        enabled = False
    if not enabled:
        class _Silent:
            def update(self, n): pass

            def close(self): pass
        return _Silent()
    return tqdm(total=total, desc="MALA", dynamic_ncols=True, mininterval=2.0, file=sys.stderr)


def save_atomic(path: Path, array: np.ndarray) -> None:
    """np.save to a temporary file next to ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chains", type=_positive_int, default=256, help="independent chains (default 256)")
    parser.add_argument("--burn-in", type=int, default=20000, help="adapting steps per chain, discarded")
    parser.add_argument("--steps", type=_positive_int, default=20000, help="production steps per chain")
    parser.add_argument("--thin", type=_positive_int, default=100, help="keep every THIN-th production state")
    parser.add_argument("--step-size", type=float, default=1e-3, help="initial MALA step size ε")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--threads", type=_positive_int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("lj55_reference.npy"), help="output .npy file")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 64 chains, 600 burn-in, 600 steps, thin 20 (overrides those options)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.burn_in < 0:
        raise SystemExit(f"--burn-in must be >= 0, got {args.burn_in}")
    if args.quick:
        args.chains, args.burn_in, args.steps, args.thin = 64, 600, 600, 20
    torch.set_num_threads(args.threads)
    from openmm_flowforce.targets import get_target

    target = get_target("lj55")
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    start_generator = torch.Generator().manual_seed(args.seed)
    x0 = grid_start(args.chains, target.n_particles, target.spatial_dim, generator=start_generator).to(args.device)
    start = time.perf_counter()
    result = run_mala(target, x0, args.burn_in, args.steps, args.thin, step0=args.step_size,
                      generator=generator, progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    check = equipartition(target, result["samples"])
    samples = result["samples"].reshape(-1, target.dim)
    save_atomic(args.out, samples.cpu().numpy().astype(np.float32))
    energies = result["energies"]
    summary = {
        "out": str(args.out), "n_samples": int(samples.shape[0]), "seconds": elapsed,
        "acceptance": result["acceptance"],
        "step_size_median": float(result["step"].median()),
        "energy_mean": float(energies.mean()),
        "energy_standard_error": float(energies.mean(1).std() / math.sqrt(energies.shape[0])),
        "half_virial_mean": check["mean"], "half_virial_standard_error": check["standard_error"],
        "half_virial_expected": check["expected"],
    }
    # Drift between the halves of production flags a burn-in that was too short.
    halves = energies[:, : energies.shape[1] // 2], energies[:, energies.shape[1] // 2:]
    drift = float(halves[1].mean() - halves[0].mean()) if energies.shape[1] >= 2 else float("nan")
    drift_se = (float((halves[1].mean(1) - halves[0].mean(1)).std() / math.sqrt(energies.shape[0]))
                if energies.shape[1] >= 2 else float("nan"))
    summary.update(energy_drift=drift, energy_drift_standard_error=drift_se)
    z = (check["mean"] - check["expected"]) / max(check["standard_error"], 1e-300)
    print(f"wrote {summary['n_samples']} samples to {args.out} in {elapsed:.0f} s; acceptance "
          f"{summary['acceptance']:.3f}, median step {summary['step_size_median']:.2e}")
    print(f"mean energy {summary['energy_mean']:.2f} ± {summary['energy_standard_error']:.2f}")
    print(f"energy drift (2nd − 1st half of production) {drift:+.2f} ± {drift_se:.2f}")
    print(f"equipartition: <½ x·∇u> = {check['mean']:.2f} ± {check['standard_error']:.2f}, expected "
          f"(N−1)·d/2 = {check['expected']:.1f} ({z:+.1f} standard errors)")
    if abs(z) > 3 or abs(drift) > 3 * drift_se:
        print("WARNING: not equilibrated (equipartition off or energy drifting): burn in longer"
              + (" (--quick is a smoke run only)" if args.quick else ""))
    return summary


if __name__ == "__main__":
    main()
