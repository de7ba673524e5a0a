r"""TorchScript export of a flow potential for ``openmmtorch.TorchForce``.

The exported module computes the potential of mean force of a Boltzmann generator,

    U(x) = −kT·log q(x)   (kJ/mol, positions x in nm, T fixed at export time),

through ``forward(positions)`` with positions ``(N, 3)`` in nm, float32 or float64, on
CPU or CUDA, requiring grad (as OpenMM-torch passes them), returning ``(energy, forces)``
in the positions' dtype: energy 0-dim in kJ/mol and forces F = −∂U/∂x ``(N, 3)`` in
kJ/mol/nm, computed by autograd inside the module, so ``openmmtorch.TorchForce`` runs it
with ``setOutputsForces(True)`` and does no autograd of its own. Files written before this
(no ``outputs`` entry in the metadata, :func:`outputs_forces` is False) return the energy
only; every reader here handles both.

How: the model's own eager code is *traced* (``torch.jit.trace``) once on a float64
example ``(1, N, 3)``, which records the tensor operations of ``log_prob`` without
re-implementing any flow maths; a small scripted wrapper casts the input to float64, adds
the batch dimension, calls the traced core and casts the energy back. Tracing freezes
Python control flow, so the traced graph is checked against the eager model on other
positions (energies and gradients) before the file is written.

Metadata travels inside the file (``_extra_files``, see :data:`METADATA_FILE`):
temperature, atom count, format version and the topology as PDB text, read back by
:func:`load_exported`.

Finiteness: the energy is finite for every finite input in which no two bonded atoms
coincide (a bond of length 0 has no direction, so its angles are undefined). Forces are
also finite except where a torsion is undefined: a linear angle (θ = π exactly), a
measure-zero set (see :mod:`openmm_flowforce.coordinates.internal`).
"""
from __future__ import annotations

import copy
import io
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from ..conventions import in_openmm_units, kT
from ..potentials.boltzmann import BoltzmannGenerator, load_boltzmann_generator
from .scripted import EXPORT_FORMAT, METADATA_FILE, OUTPUTS_ENERGY_FORCES, FlowPotential, _quiet_jit, save_exported

__all__ = ["EXPORTERS", "EXPORT_FORMAT", "ExportedPotential", "OUTPUTS_ENERGY_FORCES", "export_potential",
           "is_exported_file", "load_exported", "load_model_float64", "model_kind", "outputs_forces",
           "read_export_metadata"]

#: Energies of the traced graph must match eager ones to this relative tolerance (float64).
TRACE_RTOL = 1e-10
def outputs_forces(metadata: dict[str, Any]) -> bool:
    """True when the exported module returns ``(energy, forces)``; False for the energy-only
    files written before forces moved into the module."""
    return metadata.get("outputs") == OUTPUTS_ENERGY_FORCES


def read_pdb_text(text: str) -> tuple[Any, np.ndarray]:
    """OpenMM topology and positions (nm, ``(N, 3)``) from PDB text."""
    from openmm import app, unit

    pdb = app.PDBFile(io.StringIO(text))
    return pdb.topology, np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer))


class _EnergyCore(nn.Module):
    """U(x) = −kT·log q(x) for positions ``(B, N, 3)`` nm, float64: the function that is traced."""

    def __init__(self, model: BoltzmannGenerator, temperature: float):
        super().__init__()
        self.model = model
        self.temperature = float(temperature)

    def forward(self, x: Tensor) -> Tensor:
        return self.model.energy(x, self.temperature)


@dataclass
class ExportedPotential:
    """An exported file, loaded: the TorchScript module and what was stored with it.

    Attributes:
        module: ``forward(positions (N, 3) nm) -> (energy (kJ/mol), forces (kJ/mol/nm))``, or
            energy only for older files (``outputs_forces`` False).
        temperature: K; the energy is −kT·log q at this temperature.
        n_atoms: N.
        topology_pdb: PDB text of the molecule (positions: the example used for tracing).
        format: :data:`EXPORT_FORMAT`.
        path: the file it was loaded from.
        outputs_forces: the module returns ``(energy, forces)`` (see :func:`outputs_forces`).
    """

    module: torch.jit.ScriptModule
    temperature: float
    n_atoms: int
    topology_pdb: str
    format: str
    path: Path
    outputs_forces: bool = True

    def topology(self):
        """OpenMM topology and positions (nm, numpy ``(N, 3)``) from the stored PDB text."""
        return read_pdb_text(self.topology_pdb)

    def energy(self, positions: Any) -> float:
        """Energy in kJ/mol of positions ``(N, 3)`` nm (numpy, torch or Quantity)."""
        return float(self.energy_and_forces(positions)[0])

    def energy_and_forces(self, positions: Any) -> tuple[Tensor, Tensor]:
        """Energy (0-dim, kJ/mol) and forces ``(N, 3)`` kJ/mol/nm, float64, of positions
        ``(N, 3)`` nm (numpy, torch, or an ``openmm.unit`` Quantity), for files of either output kind."""
        positions = in_openmm_units(positions, "length", "positions")
        if isinstance(positions, Tensor):
            positions = positions.detach().cpu().numpy()
        x = torch.as_tensor(np.asarray(positions, dtype=np.float64)).requires_grad_(True)
        if self.outputs_forces:
            energy, forces = self.module(x)
            return energy, forces
        energy = self.module(x)
        (gradient,) = torch.autograd.grad(energy, x)
        return energy.detach(), -gradient


def load_model_float64(path: str | os.PathLike) -> BoltzmannGenerator:
    """:func:`load_boltzmann_generator` in float64 (what the exporters trace)."""
    return load_boltzmann_generator(path, torch.float64)


def _as_model(model: BoltzmannGenerator | str | os.PathLike) -> BoltzmannGenerator:
    if isinstance(model, BoltzmannGenerator):
        return model
    if isinstance(model, (str, os.PathLike)):
        if is_exported_file(model):
            raise ValueError(f"{model} is already an exported TorchScript file; export takes a model "
                             "checkpoint (.ckpt) written by the trainer")
        return load_model_float64(model)
    raise TypeError(f"model must be a BoltzmannGenerator or the path of its checkpoint, got {type(model).__name__}")


def _example_positions(model: BoltzmannGenerator) -> Tensor:
    """(1, N, 3) float64 positions to trace on: the stored topology's, else one flow sample."""
    if model.topology_pdb:
        _, positions = read_pdb_text(model.topology_pdb)
        return torch.as_tensor(positions, dtype=torch.float64)[None]
    with torch.no_grad():
        return model.sample(1).to(torch.float64)


def _check_trace(core: nn.Module, traced: nn.Module, example: Tensor, n_checks: int = 4) -> None:
    """Traced and eager energies and gradients agree on positions other than the example.

    Raises:
        RuntimeError: if they differ (Python control flow that depends on the input was
            frozen by the trace), naming the largest difference.
    """
    generator = torch.Generator().manual_seed(0)
    for i in range(n_checks):
        noise = 0.01 * (i + 1) * torch.randn(example.shape, generator=generator, dtype=torch.float64)
        x = (example + noise).requires_grad_(True)
        eager = core(x)
        (eager_grad,) = torch.autograd.grad(eager.sum(), x)
        traced_energy = traced(x)
        (traced_grad,) = torch.autograd.grad(traced_energy.sum(), x)
        eager, traced_energy = eager.detach(), traced_energy.detach()
        scale = float(eager.abs().max()) + 1.0
        error = float((traced_energy - eager).abs().max())
        grad_error = float((traced_grad - eager_grad).abs().max())
        grad_scale = float(eager_grad.abs().max()) + 1.0
        if not (error <= TRACE_RTOL * scale and grad_error <= TRACE_RTOL * grad_scale):
            raise RuntimeError(f"the traced potential differs from the eager model (|ΔU| = {error:.3g} kJ/mol, "
                               f"max |ΔF| = {grad_error:.3g} kJ/mol/nm on check {i}); the model's energy path "
                               "has input-dependent Python control flow that tracing cannot record")


def build_exported_module(model: BoltzmannGenerator, temperature: Any = 300.0,
                          example_positions: Tensor | None = None) -> torch.jit.ScriptModule:
    """The scripted :class:`FlowPotential` of ``model`` (not written anywhere).

    Args:
        model: the Boltzmann generator; a float64 copy is traced, the model is untouched.
        temperature: K, for U = −kT·log q.
        example_positions: ``(1, N, 3)`` or ``(N, 3)`` nm to trace on; default: the
            positions stored in the model's topology PDB.

    Raises:
        ValueError: bad temperature or example shape.
        RuntimeError: the traced graph does not reproduce the eager model.
    """
    temperature = float(in_openmm_units(temperature, "temperature", "temperature"))
    kT(temperature)  # validates the temperature
    core = _EnergyCore(copy.deepcopy(model).to(torch.float64).eval(), temperature)
    core.requires_grad_(False)  # only ∂U/∂x is ever needed: skip parameter gradients
    example = _example_positions(core.model) if example_positions is None else \
        torch.as_tensor(example_positions, dtype=torch.float64).reshape(1, -1, 3)
    if example.shape[1] != model.n_atoms:
        raise ValueError(f"example positions have {example.shape[1]} atoms, the model has {model.n_atoms}")
    with _quiet_jit():
        # Shape-to-int conversions in the model code are recorded as constants; the
        # explicit check below proves the traced graph right on other positions.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(core, example, check_trace=False)
        _check_trace(core, traced, example)
        return torch.jit.script(FlowPotential(traced, model.n_atoms))


def export_potential(model: BoltzmannGenerator | str | os.PathLike, out_path: str | os.PathLike,
                     temperature: Any = None, example_positions: Tensor | None = None) -> Path:
    """Write the flow potential U = −kT·log q as a TorchScript file for ``openmmtorch.TorchForce``.

    Args:
        model: a :class:`BoltzmannGenerator`, or the path of a trainer checkpoint of one (or
            a CG model, handed to its exporter in :data:`EXPORTERS`).
        out_path: file to write (atomically: a reader never sees a partial file).
        temperature: K or an ``openmm.unit`` Quantity; the energy scale is fixed at export time.
            Default: the temperature stored in the checkpoint (the data's; 300 K for a model
            object), see :func:`~openmm_flowforce.export.models.flow_temperature`. CG models
            are exported at the temperature they were fitted at.
        example_positions: positions to trace on (default: those in the model's PDB).

    Returns:
        ``out_path`` as a :class:`~pathlib.Path`.

    Example:
        >>> export_potential("model.ckpt", "model.pt", temperature=300.0)   # doctest: +SKIP
        >>> import openmmtorch; force = openmmtorch.TorchForce("model.pt")  # doctest: +SKIP
    """
    temperature = in_openmm_units(temperature, "temperature", "temperature")
    exporter = EXPORTERS.get(model_kind(model))
    if exporter is not None:
        return exporter(model, out_path, temperature)
    from .models import flow_temperature  # models imports this module's helpers when called

    bg = _as_model(model)
    temperature = flow_temperature(model, temperature)
    module = build_exported_module(bg, temperature, example_positions)
    metadata = {"format": EXPORT_FORMAT, "temperature": float(temperature), "n_atoms": bg.n_atoms,
                "torch_version": torch.__version__, "outputs": OUTPUTS_ENERGY_FORCES,
                "energy": "U = -kT log q(x), kJ/mol; positions (N, 3) nm"}
    return save_exported(module, metadata, bg.topology_pdb, out_path)


def _export_cg(model: Any, out_path: str | os.PathLike, temperature: float | None) -> Path:
    from .cg import export_cg_potential  # heavy and rarely needed: imported on use

    return export_cg_potential(model, out_path, temperature)


#: Model kind (the ``kind`` in a checkpoint's metadata) → exporter ``(model, out, temperature)``
#: for the kinds :func:`export_potential` does not trace itself (it handles Boltzmann generators).
EXPORTERS: dict[str, Callable[[Any, str | os.PathLike, float | None], Path]] = {"cg_energy_net": _export_cg}


def model_kind(model: Any) -> str | None:
    """The kind of a model object or checkpoint path (``boltzmann_generator``, ``cg_energy_net``,
    ...); None when it cannot be told (the caller's own checks then report the problem)."""
    if isinstance(model, BoltzmannGenerator):
        return "boltzmann_generator"
    if isinstance(model, tuple) and model:
        from ..potentials.cg_net import MODEL_KIND as CG_KIND, CGNet

        if isinstance(model[0], CGNet):  # any CG net: MLP, SchNet
            return CG_KIND
    if isinstance(model, (str, os.PathLike)) and Path(model).is_file() and not is_exported_file(model):
        from ..io import load_checkpoint

        try:
            return load_checkpoint(model).get("metadata", {}).get("kind")
        except Exception:  # noqa: BLE001 - not a checkpoint: _as_model says what is wrong
            return None
    return None


def is_exported_file(path: str | os.PathLike) -> bool:
    """True if ``path`` is a TorchScript archive written by :func:`export_potential`."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(f"/extra/{METADATA_FILE}") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def read_export_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of an exported file without loading its module: format, temperature,
    n_atoms, torch_version, ``outputs`` (absent in older, energy-only files) and ``topology_pdb``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a file written by :func:`export_potential` (or another format version).
    """
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported potential {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            names = {name.split("/extra/", 1)[-1]: name for name in archive.namelist() if "/extra/" in name}
            if METADATA_FILE not in names:
                raise ValueError(f"{path} is not a flowforce export (no {METADATA_FILE} inside); "
                                 "create one with `flowforce export MODEL.ckpt --out MODEL.pt`")
            metadata = json.loads(archive.read(names[METADATA_FILE]))
            metadata["topology_pdb"] = archive.read(names["topology.pdb"]).decode() if "topology.pdb" in names else ""
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not a TorchScript file (not a zip archive); "
                         "create one with `flowforce export MODEL.ckpt --out MODEL.pt`") from None
    if metadata.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} has export format {metadata.get('format')!r}; this version reads {EXPORT_FORMAT!r}: "
                         "re-export it from its checkpoint")
    return metadata


def load_exported(path: str | os.PathLike, device: str | torch.device = "cpu") -> ExportedPotential:
    """Load an exported file: its TorchScript module and metadata.

    Loading the module with ``torch.jit.load`` is safe; what crashes with this openmm-torch
    is deserialising an OpenMM *System* that contains a TorchForce (see
    :func:`openmm_flowforce.export.system.save_system`).
    """
    metadata = read_export_metadata(path)
    with _quiet_jit():
        module = torch.jit.load(str(path), map_location=device)
    module.eval()
    temperature = float(metadata["temperature"])
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{path} records an invalid temperature {temperature!r}")
    return ExportedPotential(module=module, temperature=temperature, n_atoms=int(metadata["n_atoms"]),
                             topology_pdb=metadata["topology_pdb"], format=metadata["format"], path=Path(path),
                             outputs_forces=outputs_forces(metadata))
