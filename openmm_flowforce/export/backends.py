r"""OpenMM forces that run a flow potential: a registry of backends and :func:`make_force`.

The force is the potential of mean force of a Boltzmann generator,

    U(x) = −kT·log q(x)  (kJ/mol),   F = −∂U/∂x  (kJ/mol/nm),   positions x in nm,

evaluated by one of the backends in :data:`BACKENDS`:

* ``torchforce``: openmm-torch's ``TorchForce`` running the exported TorchScript file
  (:mod:`.torchscript`), whose module returns energy and forces
  (``setOutputsForces(True)``; older energy-only files are differentiated by openmm-torch);
  no Python on the MD path. On CUDA it can use CUDA graphs.
* ``pythonforce``: ``openmm.PythonForce`` calling back into Python every step, running the
  eager model, a loaded TorchScript module, or a compiled AOTInductor package (``.pt2``,
  :mod:`.compiled`). Needs no compiled plugin.
* ``native``: the C++ plugin's ``CompiledPotentialForce`` (:mod:`.native`) running a
  compiled package (``.pt2``) through libtorch's AOTInductor loader; no Python and no
  TorchScript on the MD path. Packages only (``flowforce export --compile``).
* ``auto``: for ``.pt2`` packages ``native`` where the plugin loads, else ``pythonforce``;
  for models, checkpoints and ``.pt`` files ``torchforce`` when openmm-torch imports and
  evaluates a toy force correctly with this torch (checked once per process), else
  ``pythonforce``.

A model can be given as a :class:`~openmm_flowforce.potentials.BoltzmannGenerator`, the
path of its trainer checkpoint, the path of an exported TorchScript file, or the path of a
compiled package. The energy scale T is baked into exported files and packages; for models
and checkpoints it is chosen here.
"""
from __future__ import annotations

import copy
import functools
import io
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..conventions import in_openmm_units, kT
from ..errors import FlowforceError, OptionError
from .probes import quiet_openmmtorch_logging
from ..potentials.boltzmann import BoltzmannGenerator
from .compiled import CompiledPotential, is_package_file, load_package, read_package_metadata
from .models import DEFAULT_TEMPERATURE
from .subset import check_particles
from .torchscript import (_quiet_jit, export_potential, is_exported_file, load_exported, load_model_float64,
                          model_kind, outputs_forces, read_export_metadata)

__all__ = ["BACKENDS", "DEFAULT_TEMPERATURE", "LEARNED_FORCE_NAME", "Backend", "PotentialSource",
           "backend_names", "make_force", "resolve_backend", "resolve_potential"]

#: Name given to every learned force (``Force.getName()``); how save_system finds it.
LEARNED_FORCE_NAME = "FlowForce"


@dataclass
class PotentialSource:
    """A flow potential, resolved: an eager model, an exported file or a compiled package, and its T.

    Attributes:
        temperature: K.
        n_atoms: N.
        topology_pdb: PDB text of the molecule (may be empty for hand-built models).
        model: the eager model (None for exported files).
        exported_path: the TorchScript file (None for models, checkpoints and packages).
        masses: particle masses (dalton) stored in the exported file (CG models: bead masses,
            since CG beads may have no element); None: masses come from the topology's elements.
        package_path: the compiled AOTInductor package (``.pt2``), else None.
    """

    temperature: float
    n_atoms: int
    topology_pdb: str
    model: BoltzmannGenerator | None = None
    exported_path: Path | None = None
    masses: list[float] | None = None
    package_path: Path | None = None


#: Model kinds whose checkpoints run in OpenMM only once exported → how to export them.
CHECKPOINTS_TO_EXPORT: dict[str, str] = {"cg_energy_net": "`flowforce export CG.ckpt --out CG.pt`"}


def resolve_potential(model_or_path: Any, temperature: Any = None) -> PotentialSource:
    """A :class:`PotentialSource` from a model, a checkpoint path or an exported file path.

    Args:
        model_or_path: ``BoltzmannGenerator``, checkpoint path (``.ckpt``), exported
            TorchScript path (``.pt`` from ``flowforce export``), compiled package path
            (``.pt2``, recognised by its metadata), or a ``PotentialSource``.
        temperature: K (a number or an ``openmm.unit`` Quantity). Default: 300 K for model
            objects, the data's for checkpoints, the stored one for exported files and packages
            (which cannot be re-scaled: a different value is an error).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: not a model file, or a temperature that contradicts the exported file.
        TypeError: anything else.
    """
    temperature = in_openmm_units(temperature, "temperature", "temperature")
    if isinstance(model_or_path, PotentialSource):
        if temperature is not None and not math.isclose(float(temperature), model_or_path.temperature):
            raise ValueError(f"temperature {temperature} K differs from the potential's {model_or_path.temperature} K")
        return model_or_path
    if isinstance(model_or_path, BoltzmannGenerator):
        t = DEFAULT_TEMPERATURE if temperature is None else float(temperature)
        kT(t)  # validates
        return PotentialSource(t, model_or_path.n_atoms, model_or_path.topology_pdb, model=model_or_path)
    if isinstance(model_or_path, (str, os.PathLike)):
        path = Path(model_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} does not exist")
        package = is_package_file(path)
        if package or is_exported_file(path):
            meta = read_package_metadata(path) if package else read_export_metadata(path)
            stored = float(meta["temperature"])
            if temperature is not None and not math.isclose(float(temperature), stored):
                raise ValueError(f"{path} was exported at {stored:g} K and its energy scale kT is fixed; got "
                                 f"temperature {float(temperature):g} K: re-export the checkpoint with "
                                 f"`flowforce export MODEL.ckpt --temperature {float(temperature):g}`, or simulate "
                                 f"at {stored:g} K")
            masses = meta.get("masses")
            masses = None if masses is None else [float(m) for m in masses]
            if package:
                return PotentialSource(stored, int(meta["n_atoms"]), meta["topology_pdb"], masses=masses,
                                       package_path=path)
            return PotentialSource(stored, int(meta["n_atoms"]), meta["topology_pdb"], exported_path=path,
                                   masses=masses)
        kind = model_kind(path)
        if kind in CHECKPOINTS_TO_EXPORT:
            raise ValueError(f"{path} is a {kind} checkpoint; export it first ({CHECKPOINTS_TO_EXPORT[kind]}) and "
                             "pass the .pt file")
        from .models import flow_temperature

        return resolve_potential(load_model_float64(path), flow_temperature(path, temperature))
    raise TypeError(f"expected a BoltzmannGenerator or the path of a checkpoint, exported .pt file or compiled "
                    f".pt2 package, got {type(model_or_path).__name__}")


# --------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class Backend:
    """One way of running a flow potential in OpenMM.

    Attributes:
        name: registry name.
        description: one line for help texts.
        make: ``(source, cuda_graphs, particles) -> openmm.Force``; ``particles``: System
            indices of the model's atoms (None: the first N).
        unavailable: ``() -> reason or None``; None means the backend works here.
    """

    name: str
    description: str
    make: Callable[[PotentialSource, bool, list[int] | None], Any]
    unavailable: Callable[[], str | None]


@functools.lru_cache(maxsize=1)
def _torchforce_unavailable() -> str | None:
    """Why TorchForce cannot run here (import or toy-force failure), or None. Cached."""
    from .probes import FORCE_BACKENDS, check_force

    try:
        with quiet_openmmtorch_logging():
            import openmmtorch  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure means "not available"
        return f"openmmtorch does not import ({type(error).__name__}: {error})"
    positions = np.random.default_rng(0).uniform(-1.0, 1.0, size=(3, 3))
    with tempfile.TemporaryDirectory(prefix="flowforce-probe-") as workdir:
        result = check_force("torchforce", FORCE_BACKENDS["torchforce"], "Reference", positions, workdir)
    return None if result.passed else result.detail


def _pythonforce_unavailable() -> str | None:
    import openmm

    if not hasattr(openmm, "PythonForce"):
        return f"openmm {openmm.Platform.getOpenMMVersion()} has no PythonForce (needs openmm >= 8.5)"
    return None


def _make_torchforce(source: PotentialSource, cuda_graphs: bool, particles: list[int] | None) -> Any:
    with quiet_openmmtorch_logging():
        import openmmtorch

    if source.package_path is not None:
        raise ValueError(f"{source.package_path} is a compiled AOTInductor package; TorchForce runs TorchScript "
                         "(.pt) files only: use backend='pythonforce' for the package, or pass the .pt file")
    returns_forces = source.exported_path is None or outputs_forces(read_export_metadata(source.exported_path))
    if particles is not None and not returns_forces:
        raise FlowforceError(f"{source.exported_path} is an older energy-only export; a force on some of the "
                             "System's particles needs a file that returns forces: re-export it with "
                             "`flowforce export MODEL.ckpt --out MODEL.pt`")
    # TorchForce reads the module when constructed, so the files can go right after.
    with tempfile.TemporaryDirectory(prefix="flowforce-export-") as workdir:
        path = source.exported_path
        if path is None:
            path = export_potential(source.model, Path(workdir) / "potential.pt", source.temperature)
        if particles is not None:
            from .subset import write_subset_module

            path = write_subset_module(load_exported(path).module, particles, Path(workdir) / "subset.pt")
        force = openmmtorch.TorchForce(str(path))
    force.setOutputsForces(returns_forces)
    force.setUsesPeriodicBoundaryConditions(False)
    if cuda_graphs:
        # Only the CUDA platform reads it; elsewhere it is ignored.
        force.setProperty("useCUDAGraphs", "true")
    return force


class PotentialComputation:
    """``openmm.PythonForce`` callback: State → (U in kJ/mol, F = −∂U/∂x in kJ/mol/nm, (N, 3)).

    Holds one of: an eager model (a float64 copy, gradients of parameters off), a
    TorchScript module (returning ``(energy, forces)``, or the energy alone for older
    files), or a compiled package (:class:`~.compiled.CompiledPotential`). Picklable, so a
    System holding the force can be serialised (a TorchScript module or a package is
    pickled as the bytes of its file).

    Args:
        model: eager Boltzmann generator, or None.
        temperature: K, for the eager model.
        module: TorchScript ``(N, 3) -> (energy, forces)`` or ``-> energy``, or None.
        package: a loaded compiled package, or None.
    """

    def __init__(self, model: BoltzmannGenerator | None = None, temperature: float = DEFAULT_TEMPERATURE,
                 module: torch.jit.ScriptModule | None = None, package: CompiledPotential | None = None):
        if sum(x is not None for x in (model, module, package)) != 1:
            raise ValueError("give exactly one of model, module and package")
        if model is not None:
            model = copy.deepcopy(model).to(torch.float64).eval()
            model.requires_grad_(False)
        self.model, self.module, self.package, self.temperature = model, module, package, float(temperature)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """U (0-dim, kJ/mol) of positions ``(N, 3)`` nm, float64."""
        return self.energy_and_forces(x)[0]

    def energy_and_forces(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """U (0-dim, kJ/mol) and F ``(N, 3)`` kJ/mol/nm of positions ``(N, 3)`` nm, float64."""
        if self.package is not None:
            return self.package(x)
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = self.module(x) if self.module is not None else self.model.energy(x[None], self.temperature)[0]
            if isinstance(out, tuple):  # a TorchScript file that returns its forces
                return out[0].detach(), out[1]
            (grad,) = torch.autograd.grad(out, x)
        return out.detach(), -grad

    def __call__(self, state: Any) -> tuple[float, np.ndarray]:
        positions = np.asarray(state.getPositions(asNumpy=True)._value, dtype=np.float64)  # nm
        energy, forces = self.energy_and_forces(torch.from_numpy(positions))
        return float(energy), forces.detach().numpy()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.module is not None:
            buffer = io.BytesIO()
            with _quiet_jit():
                torch.jit.save(self.module, buffer)
            state["module"] = buffer.getvalue()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state.get("module"), bytes):
            with _quiet_jit():
                state["module"] = torch.jit.load(io.BytesIO(state["module"]), map_location="cpu")
        self.__dict__.update(state)


def _make_pythonforce(source: PotentialSource, cuda_graphs: bool, particles: list[int] | None) -> Any:
    import openmm

    if cuda_graphs:
        raise ValueError("cuda_graphs=True needs the torchforce backend (PythonForce runs in Python every step)")
    if source.package_path is not None:
        package = load_package(source.package_path)
        if package.batched:
            raise ValueError(f"{source.package_path} is a batched package ((B, N, 3) positions); an OpenMM force needs "
                             "a single-configuration one: compile it without batch=True (without --batch)")
        computation = PotentialComputation(package=package)
    elif source.exported_path is not None:
        computation = PotentialComputation(module=load_exported(source.exported_path).module)
    else:
        computation = PotentialComputation(model=source.model, temperature=source.temperature)
    force = openmm.PythonForce(computation)
    if particles is not None:
        # OpenMM then hands the computation those particles' positions, in this order, and
        # takes their forces back.
        force.setParticles(particles)
    force.setUsesPeriodicBoundaryConditions(False)
    return force


def _native_unavailable() -> str | None:
    from .native import native_unavailable

    return native_unavailable()


def _make_native(source: PotentialSource, cuda_graphs: bool, particles: list[int] | None) -> Any:
    from .native import compiled_potential_force

    if cuda_graphs:
        raise ValueError("cuda_graphs=True applies to the torchforce backend; the native plugin runs the "
                         "compiled package as it is")
    package = source.package_path
    if package is None and source.exported_path is not None:
        beside = source.exported_path.with_suffix(".pt2")
        if is_package_file(beside):
            package = beside
    if package is None:
        raise ValueError("the native backend runs compiled packages (.pt2); write one with "
                         "`flowforce export MODEL --out MODEL.pt --compile` and pass MODEL.pt2")
    metadata = read_package_metadata(package)
    if metadata.get("batched"):
        raise ValueError(f"{package} is a batched package ((B, N, 3) positions); an OpenMM force needs a "
                         "single-configuration package (compile without --batch)")
    return compiled_potential_force(package, int(metadata["n_atoms"]), metadata["dtype"], metadata["device"],
                                    particles=particles)


#: name → backend; ``auto`` is resolved by :func:`resolve_backend`, not stored here.
BACKENDS: dict[str, Backend] = {
    "torchforce": Backend("torchforce", "openmm-torch TorchForce running the exported TorchScript file",
                          _make_torchforce, _torchforce_unavailable),
    "pythonforce": Backend("pythonforce", "openmm.PythonForce calling the model or compiled package in Python "
                           "every step",
                           _make_pythonforce, _pythonforce_unavailable),
    "native": Backend("native", "the C++ plugin's CompiledPotentialForce running the compiled package (.pt2)",
                      _make_native, _native_unavailable),
}


def backend_names() -> list[str]:
    """Valid backend names, ``auto`` first."""
    return ["auto", *BACKENDS]


def resolve_backend(name: str, source: PotentialSource | None = None) -> Backend:
    """The backend called ``name``; ``auto`` picks, for a compiled package
    (``source.package_path``), ``native`` where the plugin loads, else ``pythonforce``; for
    anything else ``torchforce`` where it works, else ``pythonforce``.

    Raises:
        ValueError: unknown name (the message lists the valid ones), or a named backend
            that cannot run here (with the reason).
    """
    if name == "auto":
        if source is not None and source.package_path is not None:
            return resolve_backend("native" if _native_unavailable() is None else "pythonforce")
        return BACKENDS["torchforce"] if _torchforce_unavailable() is None else BACKENDS["pythonforce"]
    if name not in BACKENDS:
        raise OptionError(f"unknown force backend {name!r}; valid: {', '.join(backend_names())}")
    backend = BACKENDS[name]
    reason = backend.unavailable()
    if reason is not None:
        raise OptionError(f"force backend {name!r} cannot run here: {reason}; use backend='auto' "
                         "(see also `flowforce doctor`)")
    return backend


def make_force(model_or_path: Any, backend: str = "auto", temperature: Any = None,
               cuda_graphs: bool = False, particles: Sequence[int] | None = None) -> Any:
    """An OpenMM force for the flow potential U(x) = −kT·log q(x) (kJ/mol, x in nm).

    Args:
        model_or_path: ``BoltzmannGenerator``, trainer checkpoint path, exported
            TorchScript path (``flowforce export``), or compiled package path (``.pt2``,
            ``flowforce export --compile``).
        backend: ``"auto"``, ``"torchforce"``, ``"pythonforce"`` or ``"native"`` (module docstring).
        temperature: K or an ``openmm.unit`` Quantity; default 300 K for models/checkpoints,
            the stored T for exported files (a different value for an exported file is an
            error: re-export).
        cuda_graphs: ask TorchForce to capture CUDA graphs (only meaningful on the CUDA
            platform; an error with ``pythonforce``).
        particles: System indices of the model's N atoms, in the model's order, for a force
            acting on part of a larger System (e.g. a solute in solvent, :mod:`.subset`);
            None: the System's particles are exactly the model's atoms.

    Returns:
        An ``openmm.Force`` named :data:`LEARNED_FORCE_NAME`, non-periodic, acting on the
        model's atoms (``particles``, or every particle of the System).

    Example:
        >>> from openmm_flowforce.openmm import make_force            # doctest: +SKIP
        >>> system.addForce(make_force("model.pt", backend="auto"))   # doctest: +SKIP
    """
    if backend != "auto":
        resolve_backend(backend)  # a bad name fails before the model is loaded
    source = resolve_potential(model_or_path, temperature)
    chosen = resolve_backend(backend, source)
    force = chosen.make(source, bool(cuda_graphs), check_particles(particles, source.n_atoms))
    force.setName(LEARNED_FORCE_NAME)
    return force
