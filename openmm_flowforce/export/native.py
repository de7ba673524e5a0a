r"""The native plugin: ``CompiledPotentialForce``, an OpenMM Force implemented in C++ that runs an
AOTInductor package (``.pt2``, :mod:`openmm_flowforce.export.compiled`) through libtorch's
``AOTIModelPackageLoader``, with no Python on the MD path.

The library (``libOpenMMFlowForce.so``) is built by ``CMakeLists.txt`` when the package is
installed (``pip install -e .``; setup.py runs CMake against the headers and libraries of the
installed ``openmm`` and ``torch`` wheels) and lives in ``openmm_flowforce/_native/``, with a
``build_info.json`` that says how the build went.

Python reaches the C++ Force without SWIG interface files (the ``openmm`` wheel ships none): the
library registers an XML serialisation proxy when it is loaded, and :func:`compiled_potential_force`
builds the Force by deserialising its XML description, which yields an ``openmm.Force`` handle
that a System takes like any other. The same proxy lets a System holding the force go through
``XmlSerializer`` both ways; the XML names the package by path and SHA-256 and holds no code, and
a package whose bytes no longer match the hash is refused.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence
from xml.sax.saxutils import quoteattr

__all__ = ["NATIVE_DIR", "NATIVE_FORCE_TYPE", "compiled_potential_force", "compiled_force_info", "file_sha256",
           "load_native_library", "native_build_info", "native_unavailable"]

#: Where setup.py installs the plugin library and its build record.
NATIVE_DIR = Path(__file__).resolve().parent.parent / "_native"
LIBRARY_NAME = "libOpenMMFlowForce.so"
BUILD_INFO = "build_info.json"
#: The ``type`` attribute of the force's XML element (the C++ proxy's name).
NATIVE_FORCE_TYPE = "CompiledPotentialForce"
#: XML version the proxy writes and reads.
XML_VERSION = 1


def native_build_info() -> dict[str, Any]:
    """What setup.py recorded when it built (or skipped) the plugin: ``status`` (``built``,
    ``skipped``, ``failed``), ``reason``, ``torch_version``, ``openmm_version``; ``{}`` if never run."""
    path = NATIVE_DIR / BUILD_INFO
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


@functools.lru_cache(maxsize=1)
def load_native_library() -> ctypes.CDLL:
    """Load the plugin (once per process): its constructor registers the XML proxy.

    torch and openmm are imported first, so the libraries the plugin links to are already in the
    process, and the plugin uses those exact copies.

    Raises:
        RuntimeError: not built, built against another torch, or failing to load; the message
            says why and how to rebuild.
    """
    import openmm  # noqa: F401 - loads libOpenMM
    import torch

    library = NATIVE_DIR / LIBRARY_NAME
    info = native_build_info()
    rebuild = "rebuild it with `pip install -e .` (needs a C++17 compiler and cmake)"
    if not library.is_file():
        why = info.get("reason") or "it was never built"
        raise RuntimeError(f"the native plugin is not built ({why}); {rebuild}")
    built_with = info.get("torch_version")
    if built_with and built_with != torch.__version__:
        raise RuntimeError(f"the native plugin was built against torch {built_with} but torch {torch.__version__} "
                           f"is installed; {rebuild}")
    try:
        return ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
    except OSError as error:
        raise RuntimeError(f"the native plugin {library} does not load ({error}); {rebuild}") from None


@functools.lru_cache(maxsize=1)
def native_unavailable() -> str | None:
    """Why the native plugin cannot be used here, or None when it loads. Cached."""
    try:
        load_native_library()
    except RuntimeError as error:
        return str(error)
    return None


def file_sha256(path: str | os.PathLike) -> str:
    """Lower-case hex SHA-256 of a file's bytes (the hash the force records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def compiled_potential_force(package_path: str | os.PathLike, n_atoms: int, dtype: str = "float32",
                             device: str = "cpu", particles: Sequence[int] | None = None) -> Any:
    """An ``openmm.Force`` (the C++ ``CompiledPotentialForce``) that runs an AOTInductor package.

    Args:
        package_path: the ``.pt2`` file; stored as an absolute path with its SHA-256.
        n_atoms: particles the package was compiled for.
        dtype: ``float32`` or ``float64``, the package's input dtype.
        device: ``cpu`` or ``cuda`` (CUDA packages run on ``cuda:0``).
        particles: System indices of the model's particles, in the model's order; None: the
            first ``n_atoms`` particles.

    Raises:
        RuntimeError: the plugin is not available (the reason is given).
        FileNotFoundError: no such package.
        ValueError: bad arguments (the C++ side's message).
    """
    import openmm

    load_native_library()
    path = Path(package_path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"compiled package {path} does not exist; write one with "
                                "`flowforce export MODEL --out MODEL.pt --compile`")
    children = "".join(f'<Particle index="{int(p)}"/>' for p in (particles or ()))
    xml = (f'<Force type="{NATIVE_FORCE_TYPE}" version="{XML_VERSION}" package={quoteattr(str(path))} '
           f'sha256="{file_sha256(path)}" numModelParticles="{int(n_atoms)}" dtype={quoteattr(dtype)} '
           f'device={quoteattr(device)} forceGroup="0" name="{NATIVE_FORCE_TYPE}"><Particles>{children}'
           '</Particles></Force>')
    from ..safety import deserialize_xml

    try:
        # Trusted: the text is built here from the caller's arguments, not read from a file.
        return deserialize_xml(xml, source="the CompiledPotentialForce description", trust=True)
    except openmm.OpenMMException as error:
        raise ValueError(str(error)) from None


def compiled_force_info(force: Any) -> dict[str, Any] | None:
    """The settings of a ``CompiledPotentialForce`` (package, sha256, numModelParticles, dtype,
    device, particles), or None for any other force."""
    import xml.etree.ElementTree as ET

    import openmm

    root = ET.fromstring(openmm.XmlSerializer.serialize(force))
    if root.get("type") != NATIVE_FORCE_TYPE:
        return None
    return {"package": root.get("package"), "sha256": root.get("sha256"),
            "numModelParticles": int(root.get("numModelParticles")), "dtype": root.get("dtype"),
            "device": root.get("device"),
            "particles": [int(p.get("index")) for p in root.iter("Particle")]}


def _toy_module():
    """E = Σ|r|² (kJ/mol), F = −2r (kJ/mol/nm): the analytic toy of ``flowforce doctor``, built on
    call so that importing this file does not import torch."""
    import torch

    class Toy(torch.nn.Module):
        def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return (positions * positions).sum(), -2.0 * positions

    return Toy()


def write_toy_package(path: str | os.PathLike, n_atoms: int, dtype: str = "float64") -> Path:
    """Compile the analytic toy E = Σ|r|², F = −2r for ``n_atoms`` particles into a ``.pt2`` package
    that follows the compiled-potential contract (one input ``(n, 3)``, outputs ``(energy, forces)``).

    Used by ``flowforce doctor --native`` and the tests to check the plugin against exact values.
    Compiling takes tens of seconds (Inductor runs the C++ compiler)."""
    import torch

    torch_dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    program = torch.export.export(_toy_module(), (torch.zeros(int(n_atoms), 3, dtype=torch_dtype),), strict=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return path


def check_proxy_round_trip(workdir: str | os.PathLike) -> str:
    """Build a force description around a scratch file, serialise it back and compare: proves the
    library loaded and its XML proxy is registered. Returns a one-line detail; raises on failure."""
    scratch = Path(workdir) / "proxy-check.bin"
    scratch.write_bytes(b"flowforce")
    force = compiled_potential_force(scratch, 3, particles=[2, 0, 1])
    info = compiled_force_info(force)
    if info is None or info["particles"] != [2, 0, 1] or info["sha256"] != file_sha256(scratch):
        raise RuntimeError(f"the force did not survive an XML round trip: {info}")
    return f"library and XML proxy loaded ({NATIVE_DIR / LIBRARY_NAME})"
