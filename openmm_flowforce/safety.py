"""No code runs from a file the package reads, unless the user says they trust the file.

Two kinds of OpenMM XML can carry code:

* **Serialized objects** (System, State, Integrator, Force): ``openmm.XmlSerializer``
  dispatches every element's ``type`` attribute to a deserialiser, and the one for
  ``PythonForce`` *unpickles* the force's computation (hex-encoded in its ``function``
  attribute) — unpickling runs arbitrary code. Model checkpoints and datasets store the
  reference System this way (``system_xml``).
* **Force field files** (``openmm.app.ForceField``): ``<Script>`` and
  ``<InitializationScript>`` elements are passed to ``exec``, and the
  ``useDispersionCorrection`` attribute to ``eval``.

:func:`deserialize_xml` and :func:`check_forcefield_file` look at the text with the standard
library's XML parser first and refuse, *before* OpenMM sees it, anything that is not known
to be inert: an element whose ``type`` names a class outside :data:`SAFE_XML_TYPES` (an
allow-list: the standard OpenMM classes except ``PythonForce``, plus openmm-torch's
``TorchForce``, whose XML holds TorchScript, not a pickle), an attribute that holds a
hex-encoded pickle, a DOCTYPE (entity tricks), a script, or an ``eval``'d attribute that is
not a plain boolean. Every XML deserialisation in the package goes through
:func:`deserialize_xml`; a test keeps it so.

Trust. ``trust=True`` (``flowforce --trust``) skips the checks: **the file can then run any
code with your permissions** — use it only for files you made yourself. ``trust=None``
(the default everywhere) means "whatever :func:`trusted_files` says", so a command-line
flag reaches every reader without being threaded through each function.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterator

from .errors import BadFileError, UnsafeFileError

__all__ = ["SAFE_XML_TYPES", "check_forcefield_file", "check_xml", "deserialize_xml", "is_trusted",
           "trusted_files"]

#: Values of XML ``type`` attributes that :func:`check_xml` lets through: classes whose
#: OpenMM deserialiser only reads numbers, names and expressions. A module-level set so
#: that a new inert force (e.g. a native flowforce force) is one ``SAFE_XML_TYPES.add(name)``.
#: ``PythonForce`` is absent on purpose: its deserialiser unpickles.
SAFE_XML_TYPES: set[str] = {
    # containers
    "System", "State",
    # forces of the OpenMM core and its AMOEBA, Drude and RPMD plugins (OpenMM 8.6)
    "ATMForce", "AmoebaGeneralizedKirkwoodForce", "AmoebaMultipoleForce", "AmoebaTorsionTorsionForce",
    "AmoebaVdwForce", "AmoebaWcaDispersionForce", "AndersenThermostat", "CMAPTorsionForce", "CMMotionRemover",
    "ConstantPotentialForce", "CustomAngleForce", "CustomBondForce", "CustomCVForce", "CustomCentroidBondForce",
    "CustomCompoundBondForce", "CustomExternalForce", "CustomGBForce", "CustomHbondForce",
    "CustomManyParticleForce", "CustomNonbondedForce", "CustomTorsionForce", "CustomVolumeForce", "DrudeForce",
    "GBSAOBCForce", "GayBerneForce", "HarmonicAngleForce", "HarmonicBondForce", "HippoNonbondedForce",
    "LCPOForce", "MonteCarloAnisotropicBarostat", "MonteCarloBarostat", "MonteCarloFlexibleBarostat",
    "MonteCarloMembraneBarostat", "NonbondedForce", "OrientationRestraintForce", "PeriodicTorsionForce",
    "RBTorsionForce", "RGForce", "RMSDForce", "RPMDMonteCarloBarostat",
    # integrators
    "AMDForceGroupIntegrator", "AMDIntegrator", "BrownianIntegrator", "CompoundIntegrator", "CustomIntegrator",
    "DPDIntegrator", "DrudeIntegrator", "DrudeLangevinIntegrator", "DrudeNoseHooverIntegrator",
    "DrudeSCFIntegrator", "DualAMDIntegrator", "LangevinIntegrator", "LangevinMiddleIntegrator",
    "MTSIntegrator", "MTSLangevinIntegrator", "NoseHooverIntegrator", "QTBIntegrator", "RPMDIntegrator",
    "VariableLangevinIntegrator", "VariableVerletIntegrator", "VerletIntegrator",
    # tabulated functions of Custom*Force
    "Continuous1DFunction", "Continuous2DFunction", "Continuous3DFunction", "Discrete1DFunction",
    "Discrete2DFunction", "Discrete3DFunction",
    # openmm-torch: the TorchScript module as a file path or its bytes (no pickle)
    "TorchForce",
}

#: Types whose deserialiser is known to run code, with the reason (for the message).
CODE_CARRYING_TYPES: dict[str, str] = {
    "PythonForce": "its computation is stored as a Python pickle, and unpickling it runs code",
    # The XML itself is inert (a path and a SHA-256), but a Context built from it loads the
    # package it names, and an AOTInductor package is a compiled shared library.
    "CompiledPotentialForce": "it names an AOTInductor package (.pt2), which is compiled native code that runs "
                              "when a Context is created",
}

_TRUST: contextvars.ContextVar[bool] = contextvars.ContextVar("openmm_flowforce_trust_files", default=False)
_INDEX = re.compile(r"[+-]?\d+")  # data attributes named "type" hold indices (AmoebaVdwForce particles)
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")
_PLAIN_BOOLEAN = {"true", "false", "0", "1"}
_TRUST_HINT = ("if you made this file yourself and trust it, pass --trust (Python: trust=True); that lets the "
               "file run any code with your permissions")


def is_trusted(trust: bool | None = None) -> bool:
    """``trust`` if given, else the setting of the innermost :func:`trusted_files` block."""
    return _TRUST.get() if trust is None else bool(trust)


@contextlib.contextmanager
def trusted_files(trust: bool = True) -> Iterator[None]:
    """Within the block, readers called with ``trust=None`` trust (or not) their files.

    ``flowforce --trust`` wraps the whole command in ``trusted_files(True)``.
    """
    token = _TRUST.set(bool(trust))
    try:
        yield
    finally:
        _TRUST.reset(token)


def _looks_like_pickle(value: str) -> bool:
    """A hex string that decodes to a pickle of protocol 2 or later (``\\x80 <proto>``)."""
    return len(value) >= 8 and value[:2] == "80" and value[2:4] in ("02", "03", "04", "05") \
        and _HEX.fullmatch(value) is not None


def _parse(text: str, source: str) -> ET.Element:
    if not isinstance(text, str) or not text.strip():
        raise BadFileError(f"{source} is empty, not OpenMM XML; re-create the file that holds it")
    if re.search(r"<!\s*(DOCTYPE|ENTITY)", text, re.IGNORECASE):
        raise UnsafeFileError(f"{source} declares a DOCTYPE or entities, which OpenMM never writes and which can "
                              f"hide content from these checks; refused ({_TRUST_HINT})")
    try:
        return ET.fromstring(text)
    except ET.ParseError as error:
        raise BadFileError(f"{source} is not well-formed XML ({error}); it is corrupt or truncated: re-create "
                           "it") from None


def _describe(element: ET.Element) -> str:
    name = element.get("name")
    return f"<{element.tag} type=\"{element.get('type')}\"" + (f" name=\"{name}\"" if name else "") + ">"


def check_xml(text: str, source: str = "the XML", trust: bool | None = None) -> None:
    """Refuse serialized OpenMM XML that could run code when deserialised.

    Args:
        text: the XML of a System, State, Integrator, Force or tabulated function.
        source: what the text is, for messages (e.g. ``"system_xml of model.ckpt"``).
        trust: skip the checks (see the module docstring); ``None``: :func:`is_trusted`.

    Raises:
        UnsafeFileError: a ``PythonForce`` (or another type not in :data:`SAFE_XML_TYPES`),
            an attribute holding a pickle, or a DOCTYPE.
        BadFileError: the text is empty or not well-formed XML.
    """
    if is_trusted(trust):
        return
    root = _parse(text, source)
    for element in root.iter():
        kind = element.get("type")
        if kind is not None and kind not in SAFE_XML_TYPES and not _INDEX.fullmatch(kind):
            why = CODE_CARRYING_TYPES.get(kind)
            if why is not None:
                raise UnsafeFileError(f"{source} holds an OpenMM {kind} ({_describe(element)}): {why}. "
                                      f"flowforce refuses to read it; {_TRUST_HINT}")
            raise UnsafeFileError(
                f"{source} holds {_describe(element)}, a type flowforce does not know to be free of code, so it "
                f"is not deserialised. If it comes from an OpenMM plugin you trust, add it with "
                f"openmm_flowforce.safety.SAFE_XML_TYPES.add({kind!r}), or {_TRUST_HINT}")
        for attribute, value in element.attrib.items():
            if _looks_like_pickle(value):
                raise UnsafeFileError(f"{source}: attribute {attribute!r} of {_describe(element)} holds a Python "
                                      f"pickle, and unpickling runs code; refused ({_TRUST_HINT})")


def deserialize_xml(text: str, source: str = "the XML", trust: bool | None = None,
                    expected: str | None = None) -> Any:
    """``openmm.XmlSerializer.deserialize`` after :func:`check_xml`: the only way the package
    turns XML into OpenMM objects.

    Args:
        text, source, trust: as for :func:`check_xml`.
        expected: the class name the result must have (e.g. ``"System"``), or None.

    Raises:
        UnsafeFileError: see :func:`check_xml`.
        BadFileError: not valid OpenMM XML, or not an ``expected``.
    """
    import openmm

    check_xml(text, source, trust)
    try:
        obj = openmm.XmlSerializer.deserialize(text)
    except (ValueError, openmm.OpenMMException) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BadFileError(f"{source} is not a valid serialized OpenMM object ({first}); re-create it") from None
    if expected is not None and type(obj).__name__ != expected and not any(
            cls.__name__ == expected for cls in type(obj).__mro__):
        raise BadFileError(f"{source} holds an OpenMM {type(obj).__name__}, not a {expected}")
    return obj


# --------------------------------------------------------------------------- force fields

def _forcefield_data_dirs() -> list[Path]:
    from openmm.app import forcefield

    return [Path(d).resolve() for d in forcefield._getDataDirectories()]


def _is_installed(path: Path, data_dirs: list[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(folder) for folder in data_dirs)


def check_forcefield_file(name: str | os.PathLike, trust: bool | None = None, option: str = "--forcefield") -> None:
    """Refuse a user's OpenMM force field XML (and the files it includes) that would run code.

    Files installed with OpenMM or a force field package (its data directories) are code
    of the installation and are not checked; a ``name`` that is not an existing file is
    left to OpenMM, which looks it up there.

    Raises:
        UnsafeFileError: a ``<Script>`` or ``<InitializationScript>`` element (``exec``), a
            ``useDispersionCorrection`` that is not a plain boolean (``eval``), or a DOCTYPE.
        BadFileError: a file that is not well-formed XML.
    """
    if is_trusted(trust):
        return
    data_dirs = _forcefield_data_dirs()
    pending, seen = [Path(name)], set()
    while pending:
        path = pending.pop()
        if not path.is_file() or _is_installed(path, data_dirs) or path.resolve() in seen:
            continue
        seen.add(path.resolve())
        source = f"{option} {path}"
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise BadFileError(f"{source}: cannot read it as XML text ({type(error).__name__}: {error})") from None
        root = _parse(text, source)
        for element in root.iter():
            if element.tag in ("Script", "InitializationScript"):
                raise UnsafeFileError(f"{source} has a <{element.tag}> element, which OpenMM runs as Python code; "
                                      f"refused ({_TRUST_HINT})")
            value = element.get("useDispersionCorrection")
            if value is not None and value.strip().lower() not in _PLAIN_BOOLEAN:
                raise UnsafeFileError(f"{source}: useDispersionCorrection={value!r} is evaluated as Python by "
                                      f"OpenMM; only True or False is accepted ({_TRUST_HINT})")
        for include in root.findall("Include"):
            # OpenMM's order: next to the including file, then the working directory, then
            # its data directories (installed, not checked).
            target = include.get("file", "")
            for candidate in (path.parent / target, Path(target)):
                if candidate.is_file():
                    pending.append(candidate)
                    break
