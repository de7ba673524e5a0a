r"""AOTInductor packages of a potential: positions → (energy, forces), compiled ahead of time.

:func:`compile_package` writes a ``.pt2`` file (``torch._inductor.aoti_compile_and_package``)
whose one program is

    positions (N, 3) nm  →  (energy () kJ/mol, forces (N, 3) kJ/mol/nm),   F = −∂U/∂x,

in the package's dtype and on its device (``batch=True``: ``(B, N, 3) → ((B,), (B, N, 3))``
with B dynamic). The flow potential is U = −kT·log q(x) at the temperature fixed at compile
time; a CG net's energy is fixed at the temperature it was fitted at. Nothing else is
needed to call it: ``torch._inductor.aoti_load_package(path)(positions)`` from Python, or
``torch::inductor::AOTIModelPackageLoader(path).run({positions})`` from C++, return exactly
that pair. How the graph is built (one graph, forces included, constants folded, no host
synchronisation) is in :mod:`.graph`; precision (float64 geometry, networks in the package
dtype, with measured errors) in :mod:`.models`.

Metadata travel inside the package, as the PT2 archive's own extra file
``<archive root>/extra/flowforce.json`` (:data:`METADATA_ENTRY`: the archive's single
top-level folder, then ``extra/flowforce.json``), plain JSON written with the archive writer
torch uses for the package itself (so the loaders ignore it). :func:`read_package_metadata`
reads it with :mod:`zipfile` alone: no model is loaded and no code runs. Fields: ``format``
(:data:`PACKAGE_FORMAT`), ``kind``, ``n_atoms``, ``temperature`` (K), ``dtype``
(``float32``/``float64``), ``device`` (``cpu``/``cuda``), ``batched``, ``masses`` (dalton
for CG beads, else null), ``topology_pdb``, ``torch_version``, ``vectorized`` (whether the
CPU kernels use SIMD; null for CUDA), ``cpu_threads`` (null for CUDA), ``precision``,
``inputs``/``outputs`` (shapes and units in words) and, for CG nets, ``mapping``.

A package is tied to the torch version, the device kind (and on CPU the instruction set)
and one atom count. Its CPU kernels use a number of OpenMP threads fixed at compile time
(``threads``; Inductor's default is ``torch.get_num_threads()`` of the compiling process;
1 compiles serial code). Compiling a flow takes minutes (C++ compilation of thousands of
fused kernels) and needs a C++ compiler; CUDA packages are compiled on a machine with the
GPU.

Inductor's CPU code generator (torch 2.12) emits C++ that does not compile for the default
flow architecture (``error: 'tmp22' was not declared in this scope``): an indirect load in
a vectorised *tail* loop (the remainder after the last full SIMD vector) uses an index
variable that was never declared. CPU packages are therefore compiled with tail loops left
scalar (``cpp.enable_loop_tail_vec = False``; the main loops stay vectorised), which
compiles. Should another C++ error appear, :func:`compile_package` compiles once more with
scalar kernels everywhere (``cpp.vec_isa_ok = False``) and records ``"vectorized": false``.
Both settings are passed to that one compile call (``inductor_configs``), not set globally.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from .graph import check_against_eager, export_program, trace_energy_and_forces
from .models import ExportableModel, energy_module, resolve_exportable
from .torchscript import METADATA_FILE, read_pdb_text

__all__ = ["CompiledPotential", "DEVICES", "DTYPES", "METADATA_ENTRY", "PACKAGE_FORMAT", "compile_package",
           "is_package_file", "load_package", "read_package_metadata"]

#: Format tag stored in every package's metadata.
PACKAGE_FORMAT = "openmm-flowforce/aoti/1"
_FORMAT_FAMILY = "openmm-flowforce/aoti/"
#: Path of the metadata inside the package, below the archive's top-level folder.
METADATA_ENTRY = f"extra/{METADATA_FILE}"
#: Devices a package can be compiled for.
DEVICES = ("cpu", "cuda")
#: dtype names a package can be compiled for.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
#: The traced graph and the compiled package must reproduce the float64 eager model to this
#: relative tolerance (of the largest |U| or |F|, plus 1) before a package is written: a check
#: against miscompilation, not a precision claim. float64: rounding (fusion and folding
#: reassociate sums). float32: ~15× the worst force error measured for the float32 package
#: of a trained flow (7e-5, BENCHMARKS.md), since a stiffer model amplifies rounding more.
CHECK_RTOL: dict[torch.dtype, float] = {torch.float64: 1e-9, torch.float32: 1e-3}
#: Largest batch a batched package accepts.
MAX_BATCH = 1 << 20


def trace_batch_size(n_atoms: int) -> int:
    """Batch size of the example a batched program is traced with: ≥ 2 (0 and 1 are
    specialised) and unequal to the other sizes of the input (N and 3), which the tracer
    would otherwise assume equal to it ("duck sizing")."""
    return next(b for b in (4, 5, 6) if b not in (n_atoms, 3))


def batch_example(example: Tensor) -> Tensor:
    """``(B, N, 3)`` copies of ``example`` ``(N, 3)`` with 0.002 nm of noise, B from :func:`trace_batch_size`."""
    noise = torch.randn((trace_batch_size(example.shape[0]), *example.shape),
                        generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return example + (0.002 * noise).to(example)


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype}; valid: {', '.join(DTYPES)}")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_device(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; valid: {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        built = torch.version.cuda or "none"
        raise ValueError(f"device 'cuda' needs a CUDA GPU on this machine, and torch.cuda.is_available() is False "
                         f"(torch {torch.__version__}, built for CUDA {built}); compile the package on the machine "
                         "that has the GPU (a CUDA package is tied to it), or use device 'cpu'")
    return device


def _example_positions(exportable: ExportableModel) -> Tensor:
    """``(N, 3)`` float64 nm to trace with: the stored topology's, else one flow sample."""
    if exportable.topology_pdb:
        _, positions = read_pdb_text(exportable.topology_pdb)
        return torch.as_tensor(positions, dtype=torch.float64)
    with torch.no_grad():
        return exportable.model.sample(1)[0].to(torch.float64)


def _metadata(exportable: ExportableModel, dtype: torch.dtype, device: str, batched: bool,
              vectorized: bool | None, threads: int | None) -> dict[str, Any]:
    n = exportable.n_atoms
    shape = f"(B, {n}, 3)" if batched else f"({n}, 3)"
    energy_shape = "(B,)" if batched else "()"
    energy = ("U = -kT log q(x), kJ/mol" if exportable.kind == "boltzmann_generator"
              else "CG energy net E(X), kJ/mol")
    network = "flow" if exportable.kind == "boltzmann_generator" else getattr(exportable.model, "NET", "CG") + " net"
    metadata = {"format": PACKAGE_FORMAT, "kind": exportable.kind, "n_atoms": n,
                "temperature": float(exportable.temperature), "dtype": _dtype_name(dtype), "device": device,
                "batched": bool(batched), "masses": exportable.masses, "topology_pdb": exportable.topology_pdb,
                "torch_version": torch.__version__, "vectorized": vectorized, "cpu_threads": threads,
                "energy": energy,
                "inputs": f"positions {shape} {_dtype_name(dtype)} nm",
                "outputs": f"(energy {energy_shape} kJ/mol, forces {shape} kJ/mol/nm = -dU/dx), {_dtype_name(dtype)}",
                "precision": f"geometry float64, {network} {_dtype_name(dtype)}"}
    metadata.update(exportable.extra)
    return metadata


def _aoti_compile(program: torch.export.ExportedProgram, package_path: Path, device: str, vectorize: bool,
                  threads: int) -> None:
    """``aoti_compile_and_package`` with the CPU code-generation workarounds (module docstring)."""
    configs: dict[str, Any] = {}
    if device == "cpu":
        configs = {"cpp.enable_loop_tail_vec": False} if vectorize else {"cpp.vec_isa_ok": False}
        configs["cpp.threads"] = threads
    torch._inductor.aoti_compile_and_package(program, package_path=str(package_path), inductor_configs=configs)


def _is_cpp_compile_error(error: BaseException | None) -> bool:
    from torch._inductor.exc import CppCompileError

    while error is not None:
        if isinstance(error, CppCompileError) or str(error).startswith("CppCompileError"):
            return True
        error = error.__cause__ or error.__context__
    return False


def _add_metadata(compiled: Path, out: Path, metadata: dict[str, Any]) -> None:
    """Copy the records of the package ``compiled`` into ``out`` and add the metadata entry."""
    from torch.export.pt2_archive import PT2ArchiveReader, PT2ArchiveWriter

    with PT2ArchiveReader(str(compiled)) as reader:
        records = {name: reader.read_bytes(name) for name in reader.get_file_names()}
    with PT2ArchiveWriter(str(out)) as writer:
        for name, data in records.items():
            if name != METADATA_ENTRY:
                writer.write_bytes(name, data)
        writer.write_string(METADATA_ENTRY, json.dumps(metadata, indent=1))


def compile_package(model_or_path: Any, out_path: str | os.PathLike, temperature: Any = None,
                    device: str = "cpu", dtype: torch.dtype | str = torch.float32, batch: bool = False,
                    threads: int | None = None, progress: Callable[[str], None] | None = None) -> Path:
    """Compile a potential's energy and forces into an AOTInductor package (``.pt2``).

    Args:
        model_or_path: ``BoltzmannGenerator`` or its checkpoint path; a CG model file or the
            ``(CGNet, CGMapping, topology_pdb)`` tuple (see :mod:`.models`).
        out_path: the ``.pt2`` file to write (atomically: compiled in a temporary folder
            beside it, then renamed).
        temperature: K or an ``openmm.unit`` Quantity. Flows: default 300 K. CG nets: None or the fitted temperature.
        device: ``"cpu"`` or ``"cuda"`` (needs a GPU here: packages are compiled on the
            machine that runs them).
        dtype: ``torch.float32`` (default) or ``torch.float64`` (or their names): the
            dtype of positions, energy and forces, and the compute dtype of the networks.
        batch: compile ``(B, N, 3) → ((B,), (B, N, 3))`` with a dynamic B instead of one
            configuration.
        threads: OpenMP threads of the CPU kernels, fixed in the package (default:
            ``torch.get_num_threads()`` now; 1: serial code, often fastest for one small
            molecule per call). Ignored for CUDA.
        progress: called with a short status line before each stage (compiling takes minutes).

    Returns:
        ``out_path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: bad device, dtype, path suffix, temperature or model.
        RuntimeError: the traced or compiled program does not reproduce the eager model.

    Example:
        >>> compile_package("model.ckpt", "model.pt2", temperature=300.0)        # doctest: +SKIP
        >>> energy, forces = torch._inductor.aoti_load_package("model.pt2")(x)  # doctest: +SKIP
    """
    say = progress or (lambda message: None)
    out = Path(out_path)
    if out.suffix != ".pt2":
        raise ValueError(f"an AOTInductor package must be a .pt2 file, got {out}")
    device, dtype = _check_device(device), _dtype(dtype)
    threads = torch.get_num_threads() if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    exportable = resolve_exportable(model_or_path, temperature)
    energy = energy_module(exportable, dtype).to(device)
    reference = energy if dtype == torch.float64 else energy_module(exportable, torch.float64).to(device)
    example = _example_positions(exportable).to(device=device, dtype=dtype)
    if batch:
        example = batch_example(example)
    rtol = CHECK_RTOL[dtype]
    say(f"tracing energy and forces ({exportable.kind}, {exportable.n_atoms} particles, {_dtype_name(dtype)})")
    graph = trace_energy_and_forces(energy, example, batched=batch)
    check_against_eager(graph, reference, example, rtol)
    say("exporting (torch.export, strict)")
    program = export_program(graph, example, batched=batch, max_batch=MAX_BATCH)
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        compiled = workdir / "compiled" / out.name
        compiled.parent.mkdir()
        vectorize = device == "cpu"
        say(f"compiling with AOTInductor for {device} (C++ compilation: minutes for a flow)")
        try:
            _aoti_compile(program, compiled, device, vectorize=vectorize, threads=threads)
        except Exception as error:  # noqa: BLE001 - Inductor wraps C++ errors in several types
            if not (vectorize and _is_cpp_compile_error(error)):
                raise
            say("vectorised CPU kernels did not compile (an Inductor code-generation bug); "
                "compiling again with scalar kernels")
            vectorize = False
            _aoti_compile(program, compiled, device, vectorize=False, threads=threads)
        final = workdir / out.name
        cpu = device == "cpu"
        _add_metadata(compiled, final, _metadata(exportable, dtype, device, batch, vectorize if cpu else None,
                                                 threads if cpu else None))
        say("checking the package against the eager model")
        package = load_package(final)
        check_against_eager(package.runner, reference, example, rtol)
        os.replace(final, out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    say(f"wrote {out}")
    return out


def is_package_file(path: str | os.PathLike) -> bool:
    """True if ``path`` is a package written by :func:`compile_package` (any format version).

    TorchScript exports carry a metadata entry of the same name (their format differs), so
    the format is read, not only the entry's presence.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = [name for name in archive.namelist() if _is_metadata_entry(name)]
            if not names:
                return False
            metadata = json.loads(archive.read(names[0]))
    except (OSError, zipfile.BadZipFile, ValueError):
        return False
    return isinstance(metadata, dict) and str(metadata.get("format", "")).startswith(_FORMAT_FAMILY)


def _is_metadata_entry(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 3 and "/".join(parts[1:]) == METADATA_ENTRY


def read_package_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a package (module docstring), read as JSON without loading the model.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a package written by :func:`compile_package` (or another format).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"compiled package {path} does not exist")
    hint = "create one with `flowforce export MODEL --out MODEL.pt --compile`"
    try:
        with zipfile.ZipFile(path) as archive:
            names = [name for name in archive.namelist() if _is_metadata_entry(name)]
            if not names:
                raise ValueError(f"{path} is not a flowforce package (no {METADATA_ENTRY} inside); {hint}")
            metadata = json.loads(archive.read(names[0]))
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not an AOTInductor package (not a zip archive); {hint}") from None
    if metadata.get("format") != PACKAGE_FORMAT:
        raise ValueError(f"{path} has package format {metadata.get('format')!r}; this version reads "
                         f"{PACKAGE_FORMAT!r}: compile it again from its model file")
    return metadata


class CompiledPotential:
    """A loaded package: ``positions → (energy, forces)`` as float64 CPU tensors.

    Call it with positions ``(N, 3)`` nm (``(B, N, 3)`` for a batched package) as numpy or
    torch, any float dtype; they are cast to the package's dtype and device. Returns energy
    ``()`` (``(B,)``) in kJ/mol and forces ``(N, 3)`` (``(B, N, 3)``) in kJ/mol/nm, float64,
    on the CPU. Picklable (as the bytes of the package), so an OpenMM System holding a
    PythonForce that calls it can be serialised.

    Attributes:
        metadata: :func:`read_package_metadata` of the file.
        path: the file it was loaded from.
        runner: the AOTInductor model (``runner(x)`` with x already in dtype and device).
    """

    def __init__(self, path: str | os.PathLike, metadata: dict[str, Any] | None = None, data: bytes | None = None):
        self.path = Path(path)
        self.metadata = read_package_metadata(self.path) if metadata is None else metadata
        self.n_atoms = int(self.metadata["n_atoms"])
        self.temperature = float(self.metadata["temperature"])
        self.dtype = DTYPES[self.metadata["dtype"]]
        device = self.metadata["device"]
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{self.path} was compiled for CUDA, and torch.cuda.is_available() is False here: run it "
                             "on a machine with the GPU, or compile a CPU package (device='cpu')")
        self.device = torch.device(_check_device(device))
        self.batched = bool(self.metadata.get("batched", False))
        self._data = data  # kept when loaded from bytes: the path may not exist here
        source: Any = str(self.path) if data is None else io.BytesIO(data)
        self.runner = torch._inductor.aoti_load_package(source)

    def _positions(self, positions: Any) -> Tensor:
        x = positions if isinstance(positions, Tensor) else torch.as_tensor(np.asarray(positions))
        if not x.is_floating_point():
            raise ValueError(f"positions must be floating point (nm), got {x.dtype}")
        want = f"(B, {self.n_atoms}, 3)" if self.batched else f"({self.n_atoms}, 3)"
        ndim = 3 if self.batched else 2
        if x.dim() != ndim or x.shape[-1] != 3:
            raise ValueError(f"expected positions of shape {want} in nm, got {tuple(x.shape)}")
        if x.shape[-2] != self.n_atoms:
            raise ValueError(f"positions have {x.shape[-2]} atoms, but the package {self.path.name} was compiled for "
                             f"{self.n_atoms}: expected shape {want}")
        return x.detach().to(device=self.device, dtype=self.dtype).contiguous()

    def __call__(self, positions: Any) -> tuple[Tensor, Tensor]:
        energy, forces = self.runner(self._positions(positions))
        return energy.to("cpu", torch.float64), forces.to("cpu", torch.float64)

    def __getstate__(self) -> dict[str, Any]:
        data = self._data if self._data is not None else self.path.read_bytes()
        return {"path": str(self.path), "metadata": self.metadata, "data": data}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["metadata"], state["data"])

    def __repr__(self) -> str:
        return (f"CompiledPotential({self.path.name}: {self.metadata['kind']}, {self.n_atoms} particles, "
                f"{self.metadata['dtype']} on {self.metadata['device']}{', batched' if self.batched else ''})")


def load_package(path: str | os.PathLike) -> CompiledPotential:
    """Load a package written by :func:`compile_package` (see :class:`CompiledPotential`).

    Raises:
        FileNotFoundError, ValueError: as :func:`read_package_metadata`; a CUDA package on a
            machine without a GPU.
    """
    return CompiledPotential(path)

