r"""What the compiled exports take: model kinds, how each is resolved, and its energy module.

A model to export is a Boltzmann generator (the object or its trainer checkpoint; the energy
is the potential of mean force U = −kT·log q at a temperature chosen at export time) or a CG
energy network (its model file, or the ``(CGNet, CGMapping, topology_pdb)`` tuple the
TorchScript CG exporter takes; its energy is fixed at the temperature it was fitted at). The
kinds are told apart by :func:`~.torchscript.model_kind`, the same rule the TorchScript
exporters use, and :data:`ENERGY_MODULES` maps each kind to its energy module.

Precision. An energy module computes in two dtypes: the **geometry** (positions → internal
coordinates and the unit-cube map with its log-determinant for a flow; priors and invariant
features for a CG net) always in float64, and the **network** (the flow's coupling layers,
the CG MLP) in the export dtype. The geometry is O(N) cheap arithmetic; the networks are
where the time goes. float64 geometry is needed because the flow amplifies errors of its
input: bonds are normalised by scales of ~0.001–0.003 nm, so float32 rounding of a bond
length (~6e-9 nm) moves u by ~2e-6 standard deviations, and a trained flow's density is
sharp in u. Measured on the default flow architecture (8 layers, hidden 128, 8 components,
300 Adam steps of NLL on alanine dipeptide MD) and a 5-bead CG net, on 100 held-out frames,
float32 positions given to every variant, errors against float64 eager on the same
positions (``python bench/bench_compiled.py --only precision``; |ΔU| in kJ/mol, |ΔF| as
max|ΔF| / max|F| per frame; median / worst):

=====================================  ===================  ===================
flow (|U| ≈ 460 kJ/mol, max|F| ≈ 3e4)   |ΔU|                 |ΔF|
=====================================  ===================  ===================
all float32                             2.0e-4 / 9.0e-4      5.0e-5 / 1.2e-3
float64 geometry, float32 flow (here)   3.1e-5 / 2.4e-4      5.9e-6 / 4.1e-5
float64, output rounded to float32      7.0e-6 / 3.0e-5      2.9e-8 / 5.4e-8
=====================================  ===================  ===================

so float64 geometry makes the typical force error of a flow 8× and the worst 30× smaller,
at no measurable cost (eager energy + forces of the default flow, interleaved medians:
90.5 ms all float32 vs 90.1 ms mixed for one configuration, 505 vs 489 ms for 256). For the
CG net (|U| ≈ 25 kJ/mol, max|F| ≈ 1.5e3) all float32 gives 7.6e-6 kJ/mol and 2.1e-6
relative force error (medians; worst 3.9e-5 and 9.6e-6); float64 priors and features bring
both to the float32 output floor (4.0e-7 kJ/mol, 3.5e-8). Energies are summed in float64
and cast to the export dtype at the end. With ``dtype=torch.float64`` everything is
float64 and the module equals the eager model to rounding.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..conventions import energy_from_log_prob, kT
from ..potentials.boltzmann import MODEL_KIND as FLOW_KIND
from ..potentials.boltzmann import BoltzmannGenerator
from ..potentials.cg_net import MODEL_KIND as CG_KIND

__all__ = ["CGEnergy", "DEFAULT_TEMPERATURE", "ENERGY_MODULES", "ExportableModel", "FlowEnergy", "energy_module",
           "flow_temperature",
           "resolve_exportable"]

#: Temperature (K) of U = −kT·log q when a flow model or checkpoint is given without one.
DEFAULT_TEMPERATURE = 300.0


@dataclass
class ExportableModel:
    """A model resolved for export, with what goes into the exported file's metadata.

    Attributes:
        kind: ``boltzmann_generator`` or ``cg_energy_net``.
        model: the eager model (``BoltzmannGenerator`` or a ``CGNet``), float64, eval mode.
        temperature: K (flows: the energy scale chosen; CG nets: the temperature fitted at).
        n_atoms: particles (atoms, or CG beads).
        topology_pdb: PDB text of the molecule.
        masses: dalton, for CG beads (which may have no element); None for flows.
        extra: further metadata (the CG mapping as a dict).
    """

    kind: str
    model: nn.Module
    temperature: float
    n_atoms: int
    topology_pdb: str
    masses: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def flow_temperature(model_or_path: Any, temperature: Any = None) -> float:
    """The temperature (K) at which a flow is exported: ``temperature`` if given, else the one
    stored in its checkpoint (that of the data it was fitted to), else :data:`DEFAULT_TEMPERATURE`.

    Another temperature than the stored one is allowed, with a warning that says what it means:
    U = −kT′·log q is the potential whose Boltzmann distribution at T′ is the learned q, i.e.
    the ensemble at the fitted temperature, not the system at T′.
    """
    import os
    import warnings

    stored = None
    if isinstance(model_or_path, (str, os.PathLike)):
        from ..io import load_checkpoint

        try:
            stored = load_checkpoint(model_or_path).get("metadata", {}).get("temperature")
        except Exception:  # noqa: BLE001 - not a checkpoint: the loader of the caller says what is wrong
            stored = None
    if temperature is None:
        t = DEFAULT_TEMPERATURE if stored is None else float(stored)
    else:
        from ..conventions import in_openmm_units

        t = float(in_openmm_units(temperature, "temperature", "temperature"))
        if stored is not None and not math.isclose(t, float(stored)):
            warnings.warn(f"{model_or_path} was fitted to data at {float(stored):g} K and is exported at {t:g} K: "
                          f"U = -kT log q at {t:g} K makes MD at {t:g} K sample the learned {float(stored):g} K "
                          f"ensemble, not the system at {t:g} K (omit the temperature to export at "
                          f"{float(stored):g} K)", UserWarning, stacklevel=2)
    kT(t)  # validates
    return t


def resolve_exportable(model_or_path: Any, temperature: Any = None) -> ExportableModel:
    """An :class:`ExportableModel` from a model object, a checkpoint/model file, or a CG tuple.

    Args:
        model_or_path: ``BoltzmannGenerator`` or its checkpoint path; a CG model file or
            ``(CGNet, CGMapping, topology_pdb)``.
        temperature: K. Flows: default the checkpoint's (:func:`flow_temperature`). CG nets:
            None or the temperature they were fitted at.

    Raises:
        FileNotFoundError, ValueError, TypeError: as the TorchScript exporters (an exported
            ``.pt`` file, an unknown kind, a CG temperature other than the fitted one).
    """
    from ..conventions import in_openmm_units
    from .torchscript import _as_model, model_kind

    temperature = in_openmm_units(temperature, "temperature", "temperature")
    kind = model_kind(model_or_path)
    if kind == CG_KIND:
        from .cg import resolve_cg_model

        net, mapping, topology_pdb, own = resolve_cg_model(model_or_path, temperature)
        net = copy.deepcopy(net).to(torch.float64).eval()
        return ExportableModel(CG_KIND, net, own, net.n_beads, topology_pdb,
                               masses=[float(m) for m in mapping.masses], extra={"mapping": mapping.to_dict()})
    if kind not in (None, FLOW_KIND):
        raise ValueError(f"cannot export a model of kind {kind!r}; exportable kinds: {', '.join(ENERGY_MODULES)}")
    bg = _as_model(model_or_path)  # raises for anything that is not a flow model or its checkpoint
    t = flow_temperature(model_or_path, temperature)
    bg = copy.deepcopy(bg).to(torch.float64).eval()
    return ExportableModel(FLOW_KIND, bg, t, bg.n_atoms, bg.topology_pdb)


def _frozen(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    module = copy.deepcopy(module).to(dtype).eval()
    module.requires_grad_(False)  # only ∂U/∂x is ever needed
    return module


class FlowEnergy(nn.Module):
    """U(x) = −kT·log q(x) of a Boltzmann generator, ``(B, N, 3)`` nm → ``(B,)`` kJ/mol.

    The internal coordinates (x → u, ladj) in float64, the flow in ``dtype`` (module
    docstring); the output in the input's dtype.

    Args:
        model: the Boltzmann generator (copied; the original is untouched).
        temperature: K.
        dtype: compute dtype of the flow.
    """

    def __init__(self, model: BoltzmannGenerator, temperature: float, dtype: torch.dtype):
        super().__init__()
        self.coordinates = _frozen(model.coordinates, torch.float64)
        self.flow = _frozen(model.flow, dtype)
        self.temperature = float(temperature)
        self.dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        u, ladj = self.coordinates.to_unit(x.to(torch.float64), check=False)
        log_q = self.flow.log_prob(u.to(self.dtype)).to(torch.float64) + ladj
        return energy_from_log_prob(log_q, self.temperature).to(x.dtype)


class CGEnergy(nn.Module):
    """E(X) of a CG energy net, ``(B, n, 3)`` nm → ``(B,)`` kJ/mol.

    Priors and features in float64, the network (MLP, or SchNet on the pair distances) in
    ``dtype`` (module docstring); the output in the input's dtype. Equals :meth:`CGNet.forward`
    in float64.

    Args:
        net: the CG energy net (copied).
        dtype: compute dtype of the MLP.
    """

    def __init__(self, net: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.net = _frozen(net, torch.float64)
        self.network = _frozen(net.network, dtype)
        self.dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        x64 = x.to(torch.float64)
        learned = self.network(self.net.features(x64).to(self.dtype)).squeeze(-1).to(torch.float64)
        return (self.net.prior_energy(x64) + self.net.energy_scale * learned).to(x.dtype)


#: Model kind → ``(exportable, dtype) -> energy module (B, N, 3) -> (B,)``.
ENERGY_MODULES: dict[str, Callable[[ExportableModel, torch.dtype], nn.Module]] = {
    FLOW_KIND: lambda m, dtype: FlowEnergy(m.model, m.temperature, dtype),
    CG_KIND: lambda m, dtype: CGEnergy(m.model, dtype),
}


def energy_module(exportable: ExportableModel, dtype: torch.dtype) -> nn.Module:
    """The energy module of ``exportable`` computing its networks in ``dtype``."""
    return ENERGY_MODULES[exportable.kind](exportable, dtype)
