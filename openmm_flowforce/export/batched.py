r"""Energies and forces of many configurations per call, compiled in-process with ``torch.compile``.

For Boltzmann-generator sampling, reweighting and training targets, which evaluate a learned
potential on batches ``(B, N, 3)``. Two compiled routes exist:

* a batched AOTInductor package (:func:`~.compiled.compile_package` with ``batch=True``,
  loaded with :func:`~.compiled.load_package`): compiled once, ahead of time, to a file;
* :func:`compile_batched` here: the same batched energy+forces graph (:mod:`.graph`)
  compiled by ``torch.compile`` in this process (on the first call, minutes for a flow).

Measured per configuration (BENCHMARKS.md, float32, one CPU thread): for the default flow
``torch.compile`` takes 235 / 186 µs at B = 64 / 1024 against the package's 377 / 344 µs;
for the 5-bead CG net the package is faster (23 / 11 µs against 42 / 22 µs). Use
:func:`compile_batched` for flows in large batches and the package otherwise.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .compiled import _check_device, _dtype, _example_positions, _is_cpp_compile_error, batch_example
from .graph import trace_energy_and_forces
from .models import ExportableModel, energy_module, resolve_exportable

__all__ = ["BatchedPotential", "compile_batched"]

class BatchedPotential:
    """``positions (B, N, 3) → (energy (B,), forces (B, N, 3))``, compiled with ``torch.compile``.

    Call it with positions in nm (numpy or torch, any float dtype, any B ≥ 1); they are cast
    to the evaluator's dtype and device. Returns energies in kJ/mol and forces F = −∂U/∂x in
    kJ/mol/nm as float64 CPU tensors (like :class:`~.compiled.CompiledPotential`). The first
    call compiles (minutes for a flow); later calls with other B reuse the dynamic-shape code.

    Attributes:
        exportable: the resolved model (kind, temperature, atom count, ...).
        dtype: compute dtype of the networks and of positions, energies and forces inside.
        device: where it runs.
        vectorized: whether the CPU kernels use SIMD (False after the scalar fallback).
    """

    def __init__(self, exportable: ExportableModel, dtype: torch.dtype, device: str):
        self.exportable, self.dtype, self.device = exportable, dtype, torch.device(device)
        self.n_atoms = exportable.n_atoms
        energy = energy_module(exportable, dtype).to(self.device)
        example = batch_example(_example_positions(exportable).to(device=self.device, dtype=dtype))
        self._graph = trace_energy_and_forces(energy, example, batched=True)
        self.vectorized = self.device.type == "cpu"
        self._compiled = self._compile(self.vectorized)

    def _compile(self, vectorize: bool) -> Any:
        # Same CPU code-generation workarounds as the packages (see .compiled), for this graph only.
        options: dict[str, Any] = {}
        if self.device.type == "cpu":
            options = {"cpp.enable_loop_tail_vec": False} if vectorize else {"cpp.vec_isa_ok": False}
        return torch.compile(self._graph, dynamic=True, options=options)

    def _positions(self, positions: Any) -> Tensor:
        x = positions if isinstance(positions, Tensor) else torch.as_tensor(np.asarray(positions))
        if not x.is_floating_point():
            raise ValueError(f"positions must be floating point (nm), got {x.dtype}")
        if x.dim() != 3 or x.shape[-1] != 3 or x.shape[0] < 1:
            raise ValueError(f"expected positions of shape (B, {self.n_atoms}, 3) in nm with B >= 1, "
                             f"got {tuple(x.shape)}")
        if x.shape[1] != self.n_atoms:
            raise ValueError(f"positions have {x.shape[1]} atoms, but the model has {self.n_atoms}: expected shape "
                             f"(B, {self.n_atoms}, 3)")
        return x.detach().to(device=self.device, dtype=self.dtype).contiguous()

    def evaluate(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The compiled call without conversions: ``x`` ``(B, N, 3)`` already in the
        evaluator's dtype and on its device; energies and forces come back the same way."""
        # One compiled code for every B: B = 1 is run as two copies (torch.compile would
        # specialise and recompile for a size of 1), and sizes that happen to be equal when
        # compiling (B = N) are not assumed equal for later calls (no duck sizing).
        single = x.shape[0] == 1
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            energy, forces = self._compiled(x.expand(2, -1, -1).contiguous() if single else x)
        return (energy[:1], forces[:1]) if single else (energy, forces)

    def __call__(self, positions: Any) -> tuple[Tensor, Tensor]:
        x = self._positions(positions)
        try:
            energy, forces = self.evaluate(x)
        except Exception as error:  # noqa: BLE001 - Inductor wraps C++ errors in several types
            if not (self.vectorized and _is_cpp_compile_error(error)):
                raise
            self.vectorized = False
            self._compiled = self._compile(False)
            energy, forces = self.evaluate(x)
        return energy.to("cpu", torch.float64), forces.to("cpu", torch.float64)


def compile_batched(model_or_path: Any, temperature: float | None = None, dtype: torch.dtype | str = torch.float32,
                    device: str = "cpu") -> BatchedPotential:
    """A :class:`BatchedPotential` for a flow or CG model (see :mod:`.models` for what is accepted).

    Args:
        model_or_path: ``BoltzmannGenerator`` or its checkpoint path; a CG model file or the
            ``(CGEnergyNet, CGMapping, topology_pdb)`` tuple.
        temperature: K; as :func:`~.compiled.compile_package`.
        dtype: ``torch.float32`` (default; geometry in float64) or ``torch.float64``.
        device: ``"cpu"`` or ``"cuda"``.

    Example:
        >>> evaluate = compile_batched("model.ckpt", temperature=300.0)   # doctest: +SKIP
        >>> energies, forces = evaluate(samples)                          # doctest: +SKIP
    """
    device, dtype = _check_device(device), _dtype(dtype)
    return BatchedPotential(resolve_exportable(model_or_path, temperature), dtype, device)
