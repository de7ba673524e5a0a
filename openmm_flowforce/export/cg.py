r"""TorchScript export of a CG energy network for ``openmmtorch.TorchForce``.

The exported module computes the CG energy of a :class:`~openmm_flowforce.potentials.cg_net.CGNet`,

    E(X) = Σ_priors E_prior(X) + kT·network(features(X))   (kJ/mol, bead positions X in nm; MLP or SchNet),

through ``forward(positions)`` with positions ``(n, 3)`` nm, float32 or float64, returning
``(energy, forces)`` in the positions' dtype exactly like the flow export
(:mod:`openmm_flowforce.export.torchscript`): forces by autograd inside the module, so
TorchForce runs with ``setOutputsForces(True)``. Unlike
the flow, the CG net is *scripted* (``torch.jit.script``), not traced: it has no
input-dependent control flow, and scripting records it as written.

The file's metadata (:data:`~openmm_flowforce.export.torchscript.METADATA_FILE`) has the fields
of a flow export plus ``kind`` (``cg_energy_net``) and ``masses`` (bead masses in dalton, from
the mapping): CG PDB beads may have no element (centre-of-mass beads), so
:func:`~openmm_flowforce.export.system.create_system` takes the masses from the file. The
temperature stored is the one the net was fitted at (its energy unit and priors), so a CG
file cannot be exported at another one.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch


from ..io import CHECKPOINT_FORMAT, load_checkpoint
from ..potentials.cg_net import MODEL_KIND, CGNet, load_cg_net
from .scripted import EXPORT_FORMAT, OUTPUTS_ENERGY_FORCES, FlowPotential, _quiet_jit, save_exported

__all__ = ["build_cg_module", "export_cg_potential", "resolve_cg_model"]


def build_cg_module(net: CGNet) -> torch.jit.ScriptModule:
    """The scripted :class:`~.scripted.FlowPotential` wrapper around a float64 eval-mode copy of ``net``."""
    import copy

    frozen = copy.deepcopy(net).to(torch.float64).eval()
    frozen.requires_grad_(False)  # only ∂E/∂X is ever needed
    with _quiet_jit():
        return torch.jit.script(FlowPotential(frozen, frozen.n_beads))


def resolve_cg_model(model: Any, temperature: Any = None) -> tuple[CGNet, Any, str, float]:
    """``(net, mapping, topology_pdb, temperature)`` of a CG model file or tuple.

    Args:
        model: the path of a CG model file (``flowforce cg``; ``train_cg_net`` checkpoints work
            when they store a mapping), or a ``(CGNet, CGMapping, topology_pdb)`` tuple.
        temperature: K or an ``openmm.unit`` Quantity; None or the net's own temperature (a
            CG energy is fixed at the temperature it was fitted at).

    Raises:
        ValueError: a temperature other than the net's, or a file without a mapping (masses).
    """
    from ..conventions import in_openmm_units

    temperature = in_openmm_units(temperature, "temperature", "temperature")
    if isinstance(model, (str, os.PathLike)):
        metadata = load_checkpoint(model, CHECKPOINT_FORMAT).get("metadata", {})
        net, mapping = load_cg_net(model)
        topology_pdb = metadata.get("topology_pdb", "")
        if mapping is None:
            raise ValueError(f"{model} stores no CG mapping, so the bead masses are unknown; train it with "
                             "`flowforce cg` or pass mapping= to train_cg_net")
        if not topology_pdb:
            import numpy as np

            topology_pdb = mapping.pdb_text(np.zeros((mapping.n_beads, 3)) + np.arange(mapping.n_beads)[:, None] * 0.15)
    else:
        net, mapping, topology_pdb = model
    own = float(net.config()["temperature"])
    if temperature is not None and not math.isclose(float(temperature), own):
        raise ValueError(f"this CG model was fitted at {own:g} K: its priors and energy unit are those of that "
                         f"temperature, so it cannot be exported at {float(temperature):g} K (export at {own:g} K)")
    return net, mapping, topology_pdb, own


def export_cg_potential(model: Any, out_path: str | os.PathLike, temperature: Any = None) -> Path:
    """Write a CG model as a TorchScript file for ``openmmtorch.TorchForce``.

    Args:
        model: the path of a CG model file (``flowforce cg``; ``train_cg_net`` checkpoints work
            when they store a mapping), or a ``(CGNet, CGMapping, topology_pdb)`` tuple.
        out_path: file to write, atomically.
        temperature: K or an ``openmm.unit`` Quantity; None or the net's own temperature (a
            CG energy is fixed at the temperature it was fitted at).

    Raises:
        ValueError: a temperature other than the net's, or a file without a mapping (masses).
    """
    net, mapping, topology_pdb, own = resolve_cg_model(model, temperature)
    module = build_cg_module(net)
    metadata = {"format": EXPORT_FORMAT, "kind": MODEL_KIND, "temperature": own, "n_atoms": net.n_beads,
                "masses": [float(m) for m in mapping.masses], "torch_version": torch.__version__,
                "outputs": OUTPUTS_ENERGY_FORCES, "energy": "CG energy net E(X), kJ/mol; positions (n, 3) nm",
                "mapping": mapping.to_dict()}
    return save_exported(module, metadata, topology_pdb, out_path)
