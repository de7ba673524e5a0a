r"""Energy and forces of a potential as one traced graph, ready for ``torch.export`` and AOTInductor.

The graph maps positions x (nm) to ``(U, F)`` with U in kJ/mol and F = −∂U/∂x in kJ/mol/nm:

* single configuration: ``(N, 3) → (energy (), forces (N, 3))``;
* batched: ``(B, N, 3) → (energy (B,), forces (B, N, 3))`` with B dynamic.

How it is built, and why this way (``torch.export`` of a module that calls
``torch.autograd.grad`` fails every direct way with torch 2.12: see NATIVE_NOTES):

1. :class:`EnergyAndForces` wraps an energy module ``(B, N, 3) → (B,)`` (see :mod:`.models`)
   and takes the forces with ``torch.autograd.grad`` in its ``forward``.
2. :func:`trace_energy_and_forces` traces that forward, backward pass included, into a
   flat ATen graph with ``make_fx`` (real tensors for one configuration: shapes fixed;
   symbolic sizes for a batch). Parameters and buffers become graph constants. Tracing
   records tensor operations only, so a Python branch on a tensor *value* would fail
   loudly (``aten._local_scalar_dense``); decisions such as which torsions are narrow are
   made when the model is fitted (index buffers), not per call. The graph is then checked
   to contain no operation that synchronises with the host or has a data-dependent output
   shape (:data:`HOST_SYNC_OPS`), so a CUDA graph can capture it.
3. :func:`fold_constants` evaluates every operation whose inputs are all constants (weight
   transposes, log-scales of the normalisation, index arithmetic) once, at export time.
4. :func:`export_program` exports the graph with ``torch.export.export(..., strict=True)``
   (TorchDynamo re-traces it; nothing is left that it cannot capture).

:func:`check_against_eager` compares the graph with the float64 eager model on positions
other than the tracing example before anything is written.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, fx, nn

__all__ = ["EnergyAndForces", "HOST_SYNC_OPS", "check_against_eager", "export_program", "fold_constants",
           "trace_energy_and_forces"]

#: ATen operations that read a value back to the host or whose output shape depends on data:
#: none may appear in an exported graph (they break CUDA-graph capture and a fixed-shape trace).
HOST_SYNC_OPS = frozenset({
    "aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.nonzero_static", "aten.masked_select",
    "aten.unique", "aten._unique", "aten._unique2", "aten.unique_consecutive", "aten.unique_dim",
    "aten.repeat_interleave", "aten.bincount", "aten.argwhere", "aten.masked_scatter",
})
#: A folded constant may be at most this many elements larger than the largest constant it
#: is computed from (folding an ``expand`` would otherwise store the expanded copy).
_FOLD_GROWTH_LIMIT = 4096


class EnergyAndForces(nn.Module):
    """positions → (U, F = −∂U/∂x) around an energy module ``(B, N, 3) → (B,)``.

    Args:
        energy: the energy module (kJ/mol from nm); its output dtype is the input's.
        batched: True: ``(B, N, 3) → ((B,), (B, N, 3))``; False: ``(N, 3) → ((), (N, 3))``.
    """

    def __init__(self, energy: nn.Module, batched: bool = False):
        super().__init__()
        self.energy = energy
        self.batched = bool(batched)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            x = positions.detach().requires_grad_(True)
            energy = self.energy(x if self.batched else x.unsqueeze(0))
            (gradient,) = torch.autograd.grad(energy.sum(), x)
        energy = energy.detach() if self.batched else energy.detach().reshape(())
        return energy, -gradient


def _op_name(target: Any) -> str:
    """``aten.nonzero`` for ``torch.ops.aten.nonzero.default``."""
    name = getattr(target, "name", None)
    if callable(name):  # OpOverload: "aten::nonzero" / overload packet names
        return str(name()).split(".")[0].replace("::", ".")
    return getattr(target, "__name__", str(target))


def _check_no_host_sync(gm: fx.GraphModule) -> None:
    found = sorted({_op_name(n.target) for n in gm.graph.nodes
                    if n.op == "call_function" and _op_name(n.target) in HOST_SYNC_OPS})
    if found:
        raise RuntimeError(f"the traced energy+forces graph contains {', '.join(found)}, which synchronise with the "
                           "host or have data-dependent shapes; the model's energy path must use index buffers "
                           "decided at fit time instead of boolean masks or value-dependent branches")


def fold_constants(gm: fx.GraphModule) -> int:
    """Evaluate, once, every node whose inputs are all graph constants; returns how many.

    A node is folded when it is a pure ATen call (no random numbers, no in-place writes)
    whose tensor inputs are constants (``get_attr`` nodes or already folded ones) and whose
    result is not much larger than its inputs (:data:`_FOLD_GROWTH_LIMIT`). Its value
    becomes a new constant attribute; dead nodes and unused attributes are removed.
    """
    values: dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            values[node] = _get_attr(gm, node.target)
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        if schema.is_mutable or "rand" in schema.name or _op_name(node.target) in HOST_SYNC_OPS:
            continue
        inputs = node.all_input_nodes
        if not all(n in values for n in inputs):
            continue
        args, kwargs = fx.map_arg((node.args, node.kwargs), lambda n: values[n])
        with torch.no_grad():
            result = node.target(*args, **kwargs)
        if not isinstance(result, Tensor):
            continue
        largest = max((values[n].numel() for n in inputs if isinstance(values[n], Tensor)), default=0)
        if result.numel() > largest + _FOLD_GROWTH_LIMIT:
            continue
        name = f"_folded_constant{folded}"
        gm.register_buffer(name, result.clone(memory_format=torch.contiguous_format))
        with gm.graph.inserting_before(node):
            constant = gm.graph.get_attr(name)
        node.replace_all_uses_with(constant)
        gm.graph.erase_node(node)
        values[constant] = getattr(gm, name)
        folded += 1
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    unused = [name for name in [*vars(gm), *gm._buffers, *gm._parameters]
              if name.startswith(("_tensor_constant", "_param_constant", "_folded_constant")) and name not in used]
    for name in unused:
        delattr(gm, name)
    gm.recompile()
    return folded


def _get_attr(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def trace_energy_and_forces(energy: nn.Module, example: Tensor, batched: bool = False,
                            fold: bool = True) -> fx.GraphModule:
    """The flat ATen graph of :class:`EnergyAndForces` around ``energy``.

    Args:
        energy: energy module ``(B, N, 3) → (B,)`` (eval mode, on the example's device).
        example: positions to trace with, ``(N, 3)`` or, batched, ``(B, N, 3)`` with B ≥ 2
            (B = 1 would be specialised); its dtype and device are the graph's.
        batched: trace with a symbolic batch size.
        fold: fold constants (:func:`fold_constants`).

    Raises:
        RuntimeError: the graph contains host synchronisation (:data:`HOST_SYNC_OPS`).
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    module = EnergyAndForces(energy, batched=batched).eval()
    if batched:
        if example.dim() != 3 or example.shape[0] < 2:
            raise ValueError(f"a batched trace needs an example (B, N, 3) with B >= 2, got {tuple(example.shape)}")
        gm = make_fx(module, tracing_mode="symbolic", _allow_non_fake_inputs=True)(example)
    else:
        gm = make_fx(module, tracing_mode="real")(example)
    _check_no_host_sync(gm)
    if fold:
        fold_constants(gm)
    return gm


def export_program(gm: fx.GraphModule, example: Tensor, batched: bool = False,
                   max_batch: int = 1 << 20) -> torch.export.ExportedProgram:
    """``torch.export.export(gm, (example,), strict=True)``, the batch size dynamic when batched."""
    dynamic_shapes = None
    if batched:
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        dynamic_shapes = ({0: batch},)
    return torch.export.export(gm, (example,), dynamic_shapes=dynamic_shapes, strict=True)


def check_against_eager(graph: Callable[[Tensor], Any], reference: nn.Module, example: Tensor, rtol: float,
                        n_checks: int = 3, scale_nm: float = 0.01) -> tuple[float, float]:
    """Compare ``graph`` with :class:`EnergyAndForces` of the float64 energy module ``reference``.

    Positions are the example plus Gaussian noise of ``scale_nm · (i + 1)``, in the
    example's dtype; the reference sees the same positions in float64. Energies and forces
    must agree to ``rtol`` relative to (max |value| + 1).

    Returns:
        The largest |ΔU| (kJ/mol) and max |ΔF| (kJ/mol/nm) seen.

    Raises:
        RuntimeError: naming the difference, when they disagree.
    """
    batched = example.dim() == 3
    want = EnergyAndForces(reference, batched=batched).eval()
    generator = torch.Generator().manual_seed(0)
    worst = (0.0, 0.0)
    for i in range(n_checks):
        noise = torch.randn(example.shape, generator=generator, dtype=torch.float64).to(example.device)
        x = (example.double() + scale_nm * (i + 1) * noise).to(example.dtype)
        want_energy, want_forces = want(x.double())
        energy_out, forces_out = graph(x)
        d_energy = float((energy_out.double() - want_energy).abs().max())
        d_forces = float((forces_out.double() - want_forces).abs().max())
        worst = (max(worst[0], d_energy), max(worst[1], d_forces))
        energy_scale = float(want_energy.abs().max()) + 1.0
        forces_scale = float(want_forces.abs().max()) + 1.0
        if not (d_energy <= rtol * energy_scale and d_forces <= rtol * forces_scale):
            raise RuntimeError(f"the traced or compiled energy+forces program differs from the float64 eager model "
                               f"(|ΔU| = {d_energy:.3g} kJ/mol, max |ΔF| = {d_forces:.3g} kJ/mol/nm, tolerance "
                               f"{rtol:g} relative, check {i}, {example.dtype})")
    return worst
