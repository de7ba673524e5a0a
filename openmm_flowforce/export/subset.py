r"""A learned force acting on a subset of a System's particles (mixed ML/MM Systems).

A flow potential describes N atoms in a fixed order; in a mixed System those atoms are
some of the System's M ≥ N particles, at the indices ``particles`` (System indices, in the
model's order). Every backend then evaluates

    U(x) = U_model(x[particles]),   F_i = F_model[k] where particles[k] = i, else 0,

positions in nm, U in kJ/mol, F in kJ/mol/nm, F of shape ``(M, 3)``:

* ``torchforce``: :class:`SubsetPotential` wraps the exported module; TorchForce hands it
  the whole System's positions ``(M, 3)`` and reads forces ``(M, 3)``;
* ``pythonforce``: ``openmm.PythonForce.setParticles`` (OpenMM passes those particles'
  positions to the callback, in that order, and takes their forces back);
* ``native``: the plugin's ``CompiledPotentialForce`` takes the indices itself.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..errors import OptionError

__all__ = ["SubsetPotential", "check_particles", "learned_force_particles", "write_subset_module"]


def check_particles(particles: Sequence[int] | None, n_atoms: int, n_system: int | None = None) -> list[int] | None:
    """``particles`` as a list of ints after checking it against the model (and the System).

    Args:
        particles: System indices of the model's atoms, in the model's order, or None (the
            System's first N particles).
        n_atoms: N, the model's atom count.
        n_system: the System's particle count, when known.

    Raises:
        OptionError: wrong length, repeated, negative or out-of-range indices, or not integers.
    """
    if particles is None:
        return None
    try:
        indices = [int(p) for p in particles]
    except (TypeError, ValueError):
        raise OptionError(f"particles must be a sequence of System particle indices, got {particles!r}") from None
    if any(int(p) != p for p in particles):
        raise OptionError(f"particles must be integers, got {list(particles)!r}")
    if len(indices) != n_atoms:
        raise OptionError(f"particles has {len(indices)} indices but the model has {n_atoms} atoms; give one System "
                          "index per model atom, in the model's order")
    if len(set(indices)) != len(indices):
        repeated = sorted({p for p in indices if indices.count(p) > 1})
        raise OptionError(f"particles repeats the System indices {repeated}; each model atom needs its own particle")
    bad = [p for p in indices if p < 0 or (n_system is not None and p >= n_system)]
    if bad:
        limit = "" if n_system is None else f" (the System has {n_system} particles: 0..{n_system - 1})"
        raise OptionError(f"particles holds invalid System indices {bad}{limit}")
    return indices


class SubsetPotential(nn.Module):
    """Runs an exported potential on some of the System's particles: ``(M, 3)`` nm →
    (energy 0-dim kJ/mol, forces ``(M, 3)`` kJ/mol/nm, zero outside ``particles``).

    Args:
        inner: a module ``(N, 3) -> (energy, forces (N, 3))`` (what ``export_potential`` writes).
        particles: ``(N,)`` int64 System indices in the model's order.
    """

    def __init__(self, inner: nn.Module, particles: Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("particles", particles.to(torch.int64))

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        particles = self.particles.to(positions.device)
        energy, forces = self.inner(positions.detach().index_select(0, particles))
        out = torch.zeros_like(positions, dtype=forces.dtype)
        return energy, out.index_copy(0, particles, forces)


def write_subset_module(module: torch.jit.ScriptModule, particles: Sequence[int],
                        out_path: str | os.PathLike) -> Path:
    """Script :class:`SubsetPotential` around ``module`` and save it where TorchForce can read it."""
    from .torchscript import _quiet_jit

    with _quiet_jit():
        scripted = torch.jit.script(SubsetPotential(module, torch.tensor(list(particles), dtype=torch.int64)))
        torch.jit.save(scripted, str(out_path))
    return Path(out_path)


def learned_force_particles(force: Any) -> list[int] | None:
    """The System indices a learned force acts on (model order), or None when it acts on the
    System's particles as they are; how :func:`~.system.save_system` records them."""
    import openmm

    if isinstance(force, openmm.PythonForce):
        return [int(p) for p in force.getParticles()] or None
    from .probes import quiet_openmmtorch_logging

    try:
        with quiet_openmmtorch_logging():
            import openmmtorch
    except Exception:  # noqa: BLE001 - without openmm-torch there is no TorchForce to ask
        openmmtorch = None
    if openmmtorch is not None and openmmtorch.TorchForce.isinstance(force):
        particles = getattr(openmmtorch.TorchForce.cast(force).getModule(), "particles", None)
        return None if particles is None else [int(p) for p in particles.tolist()]
    from .native import compiled_force_info

    info = compiled_force_info(force)
    return (info["particles"] or None) if info is not None else None
