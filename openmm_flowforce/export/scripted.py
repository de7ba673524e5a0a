"""What every exported TorchScript potential shares (flow and CG alike): the format tags, the
scripted wrapper that OpenMM-torch calls, and the atomic writer.

Kept apart from :mod:`.torchscript` (flows) and :mod:`.cg` (CG nets) so that both import it
and neither imports the other at module level.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..io import atomic_write_bytes

__all__ = ["EXPORT_FORMAT", "METADATA_FILE", "OUTPUTS_ENERGY_FORCES", "FlowPotential", "save_exported"]

#: Format tag stored in every exported file.
EXPORT_FORMAT = "openmm-flowforce/torchscript/1"
#: Name of the JSON metadata entry inside the TorchScript archive.
METADATA_FILE = "flowforce.json"
#: Metadata ``outputs`` of files whose module returns ``(energy, forces)``.
OUTPUTS_ENERGY_FORCES = "energy_forces"


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    """Silence torch's TorchScript deprecation warnings: openmm-torch reads TorchScript only,
    so they are not actionable for users of this module."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+.* is deprecated", category=DeprecationWarning)
        yield


class FlowPotential(nn.Module):
    """The scripted module OpenMM-torch calls: ``(N, 3)`` nm → (energy 0-dim kJ/mol,
    forces ``(N, 3)`` kJ/mol/nm), in the positions' dtype.

    Shared by every exported potential (flow and CG): the core maps float64 positions
    ``(1, N, 3)`` to energies ``(1,)``; the forces are −∂U/∂x by autograd, taken here so
    that OpenMM-torch need not (``TorchForce.setOutputsForces(True)``). The positions must
    require grad, as OpenMM-torch passes them (from Python: ``module(x.requires_grad_())``);
    the returned tensors carry no graph. Why not make a leaf inside: an in-place
    ``requires_grad_`` in the graph stops ``torch.jit.freeze`` (which TorchForce applies)
    from folding the index buffers, and the module then runs twice the operations (measured:
    a 5-bead CG net 1.96 ms per call that way, 1.23 ms this way, 1.62 ms for the energy-only
    module plus autograd outside).

    Args:
        core: e.g. the traced :class:`_EnergyCore` of a flow, or a CG energy net.
        n_atoms: N, checked on every call.
    """

    def __init__(self, core: nn.Module, n_atoms: int):
        super().__init__()
        self.core = core
        self.n_atoms = n_atoms

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        if positions.dim() != 2 or positions.size(0) != self.n_atoms or positions.size(1) != 3:
            raise ValueError("learned potential: expected positions of shape (" + str(self.n_atoms)
                             + ", 3) in nm, got " + str(positions.shape))
        if not positions.requires_grad:
            raise ValueError("learned potential: positions must require grad, as OpenMM-torch passes them; from "
                             "Python call module(positions.requires_grad_()) (the forces -dU/dx are returned)")
        energy = self.core(positions.to(torch.float64).unsqueeze(0))
        grads = torch.autograd.grad([energy.sum()], [positions])
        gradient = grads[0]
        assert gradient is not None
        return energy.detach().reshape(()).to(positions.dtype), -gradient


def save_exported(module: torch.jit.ScriptModule, metadata: dict[str, Any], topology_pdb: str,
                  out_path: str | os.PathLike) -> Path:
    """Write a scripted potential with its metadata and topology, atomically."""
    extra = {METADATA_FILE: json.dumps(metadata, indent=1), "topology.pdb": topology_pdb}
    buffer = io.BytesIO()
    with _quiet_jit():
        torch.jit.save(module, buffer, _extra_files=extra)
    out = Path(out_path)
    atomic_write_bytes(out, buffer.getvalue())
    return out
