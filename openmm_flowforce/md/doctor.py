"""Installation check: do torch, OpenMM and openmm-torch work together on every platform?

For each OpenMM platform found, two force backends evaluate the analytic toy potential

    E(r) = Σ_i |r_i|²   (kJ/mol, positions r in nm),   F_i = −∂E/∂r_i = −2 r_i   (kJ/mol/nm)

on random positions of a few particles in a real :class:`openmm.Context`:

* ``torchforce``: openmm-torch's ``TorchForce`` loading a TorchScript module from a file;
* ``pythonforce``: ``openmm.PythonForce`` calling back into Python with numpy.

These are the two backends learned potentials run through, so a PASS on a platform means
a model exported by this package can run there. Everything heavy (torch, openmm,
openmmtorch) is imported inside the functions: the doctor exists to diagnose broken
installs, so an import failure must become a FAIL line, not a traceback.

The command line front end is ``flowforce doctor`` (:mod:`openmm_flowforce.cli`).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import platform as _platform
import re
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import FlowforceError
# The backend probes live with the backends (export/); the doctor reports them.
from ..export.probes import (_ABI_MISMATCH, FIX_HINT, FORCE_BACKENDS, TOLERANCES, CheckResult,  # noqa: F401
                             EnergyFn, ForcesFn, check_force, explain_error, quiet_openmmtorch_logging, toy_energy,
                             toy_forces)

@dataclass
class DoctorReport:
    """Everything the doctor found. ``ok`` is true only when every check passed."""

    versions: dict[str, dict[str, str | None]]
    platforms: list[str]
    plugin_load_failures: list[str]
    plugin_failure_summary: list[str]
    checks: list[CheckResult] = field(default_factory=list)
    native: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view (what ``flowforce doctor --json`` prints)."""
        out = asdict(self)
        out["checks"] = [{**asdict(c), "status": c.status} for c in self.checks]
        out["ok"] = self.ok
        return out


# --------------------------------------------------------------------------- versions


def _distribution_of(module_name: str) -> str | None:
    """Name of the installed distribution that provides top-level module ``module_name``."""
    names = importlib.metadata.packages_distributions().get(module_name)
    return names[0] if names else None


def _module_version(module_name: str) -> tuple[str | None, str | None]:
    """(version reported by the module itself, import error message) for ``module_name``."""
    try:
        with quiet_openmmtorch_logging():
            module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - any import failure is a finding to report
        return None, f"{type(error).__name__}: {error}"
    version = getattr(module, "__version__", None)
    if version is None and module_name == "openmm":
        version = module.Platform.getOpenMMVersion()
    return (str(version) if version is not None else "(no __version__)"), None


def collect_versions() -> dict[str, dict[str, str | None]]:
    """Versions of python, torch, openmm and openmmtorch.

    For each module: the distribution that installed it and its version (importlib.metadata),
    the version the imported module reports, and the import error if it did not import.
    """
    versions: dict[str, dict[str, str | None]] = {
        "python": {
            "distribution": _platform.python_implementation(),
            "distribution_version": _platform.python_version(),
            "module_version": _platform.python_version(),
            "error": None,
        }
    }
    for module_name in ("torch", "openmm", "openmmtorch"):
        dist = _distribution_of(module_name)
        dist_version = None
        if dist is not None:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                dist_version = importlib.metadata.version(dist)
        module_version, error = _module_version(module_name)
        versions[module_name] = {
            "distribution": dist,
            "distribution_version": dist_version,
            "module_version": module_version,
            "error": error,
        }
    return versions


# --------------------------------------------------------------------------- platforms


def available_platforms() -> list[str]:
    """Names of the OpenMM platforms that loaded (e.g. ``["Reference", "CPU", "CUDA"]``)."""
    import openmm

    return [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]


def plugin_load_failures() -> list[str]:
    """OpenMM's raw messages for plugin libraries that failed to load."""
    import openmm

    openmm.Platform.getNumPlatforms()  # plugins are loaded by now; make sure of it
    return list(openmm.Platform.getPluginLoadFailures())


_FAILURE = re.compile(r"Error loading library (?P<path>\S+?): (?P<reason>.*)")


def summarise_plugin_failures(failures: Sequence[str]) -> list[str]:
    """Group plugin load failures by cause, one line per cause.

    A missing ``libcuda.so.1`` / ``libOpenCL.so.1`` just means no GPU driver, which is
    expected on CPU-only machines; those lines are information, not errors. An
    ``undefined symbol`` in a Torch plugin means openmm-torch and torch do not match.
    """
    by_reason: dict[str, list[str]] = {}
    for message in failures:
        match = _FAILURE.match(message)
        if match is None:
            by_reason.setdefault(message, [])
            continue
        library = os.path.basename(match["path"])
        library = re.sub(r"^lib|\.so.*$|\.dylib$|\.dll$", "", library)
        by_reason.setdefault(match["reason"].strip(), []).append(library)
    lines = []
    for reason, libraries in by_reason.items():
        note = ""
        if "libcuda.so" in reason:
            note = " [no NVIDIA driver: expected on CPU-only machines]"
        elif "libOpenCL.so" in reason:
            note = " [no OpenCL runtime: expected on machines without one]"
        elif re.search(r"lib\w*(CUDA|OpenCL)\w*\.so", reason):
            note = " [depends on a GPU plugin that did not load]"
        elif _ABI_MISMATCH.search(reason) and any("Torch" in lib for lib in libraries):
            note = f" [openmm-torch and torch do not match; fix: {FIX_HINT}]"
        lines.append(f"{', '.join(sorted(libraries)) or '?'}: {reason}{note}")
    return lines


# --------------------------------------------------------------------------- the doctor


def native_plugin_check(report: DoctorReport, selected: Sequence[str], positions: np.ndarray, workdir: str,
                        run_package: bool, expected_energy: EnergyFn, expected_forces: ForcesFn) -> None:
    """The native plugin's rows: whether it loads (when it was built), and with ``run_package``
    the toy package through ``CompiledPotentialForce`` on every selected platform."""
    from ..export.native import (check_proxy_round_trip, compiled_potential_force, native_build_info,
                                 native_unavailable, write_toy_package)

    info = native_build_info()
    reason = native_unavailable()
    if reason is not None and info.get("status") != "built":
        # Not built here on purpose or for lack of a compiler: information, not a failure.
        report.native = f"not available: {reason}"
        return
    try:
        detail = check_proxy_round_trip(workdir) if reason is None else reason
        report.checks.append(CheckResult("native-plugin", "-", reason is None, detail))
    except Exception as error:  # noqa: BLE001 - a broken plugin is a FAIL row
        report.checks.append(CheckResult("native-plugin", "-", False, explain_error("native", error)))
        return
    report.native = "loaded" if reason is None else f"FAILED: {reason}"
    if reason is not None or not run_package:
        return
    package = os.path.join(workdir, "toy.pt2")
    try:
        write_toy_package(package, len(positions))
    except Exception as error:  # noqa: BLE001
        report.checks.append(CheckResult("native", "-", False, "compiling the toy package failed: "
                                         + explain_error("native", error)))
        return
    for platform_name in selected:
        report.checks.append(check_force("native", lambda _dir: compiled_potential_force(package, len(positions),
                                                                                         "float64"),
                                         platform_name, positions, workdir, expected_energy, expected_forces))


def run_doctor(
    platforms: Sequence[str] | None = None,
    n_particles: int = 5,
    seed: int = 2021,
    expected_energy: EnergyFn = toy_energy,
    expected_forces: ForcesFn = toy_forces,
    native: bool = False,
) -> DoctorReport:
    """Check versions, platforms and the force backends on every (or the given) platform.

    Args:
        platforms: OpenMM platform names to check; ``None`` checks every available one.
        n_particles: number of particles of the toy system.
        seed: seed of the random positions (uniform in [−1, 1] nm per coordinate).
        expected_energy: truth the backends are compared with (tests pass a wrong one to
            see the doctor report FAIL).
        expected_forces: truth for the forces.
        native: also compile the toy into an AOTInductor package (tens of seconds) and run it
            through the native plugin on every platform; without it only the plugin's loading
            and XML proxy are checked.

    Returns:
        The :class:`DoctorReport`; ``report.ok`` tells whether everything passed.

    Raises:
        ValueError: if a requested platform is not available (the message lists those that are).
    """
    versions = collect_versions()
    try:
        found = available_platforms()
        failures = plugin_load_failures()
    except Exception as error:  # noqa: BLE001 - openmm itself is broken or missing
        report = DoctorReport(versions, [], [], [])
        report.checks.append(CheckResult("openmm", "-", False, f"{type(error).__name__}: {error}"))
        return report

    if platforms is None:
        selected = found
    else:
        unknown = [name for name in platforms if name not in found]
        if unknown:
            raise FlowforceError(f"unknown OpenMM platform(s) {unknown}; available: {found}")
        selected = list(platforms)

    report = DoctorReport(versions, found, failures, summarise_plugin_failures(failures))
    positions = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(n_particles, 3))
    with _single_torch_thread(), tempfile.TemporaryDirectory(prefix="flowforce-doctor-") as workdir:
        for platform_name in selected:
            for check_name, factory in FORCE_BACKENDS.items():
                report.checks.append(
                    check_force(
                        check_name, factory, platform_name, positions, workdir, expected_energy, expected_forces
                    )
                )
        native_plugin_check(report, selected, positions, workdir, native, expected_energy, expected_forces)
    return report


@contextlib.contextmanager
def _single_torch_thread() -> Iterator[None]:
    # One thread: the check is tiny, and it must not oversubscribe cores in CI.
    try:
        import torch
    except Exception:  # noqa: BLE001 - reported by the torchforce checks
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def format_report(report: DoctorReport) -> str:
    """The human-readable report: versions, platforms, plugin failures, and a table of checks."""
    lines = ["Versions"]
    for name, info in report.versions.items():
        if name == "python":
            lines.append(f"  {name:<12} {info['module_version']}")
            continue
        dist = info["distribution"] or "(no distribution found)"
        dist_version = info["distribution_version"] or "?"
        module = info["module_version"] if info["error"] is None else f"import failed: {info['error']}"
        lines.append(f"  {name:<12} {dist} {dist_version}; module {module}")
    lines.append("")
    lines.append(f"OpenMM platforms: {', '.join(report.platforms) or '(none)'}")
    if report.plugin_failure_summary:
        lines.append(f"Plugin load failures ({len(report.plugin_load_failures)}; information, not errors):")
        lines.extend(f"  {line}" for line in report.plugin_failure_summary)
    if report.native:
        lines.append(f"Native plugin: {report.native}")
    lines.append("")

    header = ("check", "platform", "result", "detail")
    rows = [(c.name, c.platform, c.status, c.detail) for c in report.checks]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    fmt = f"{{:<{widths[0]}}}  {{:<{widths[1]}}}  {{:<{widths[2]}}}  {{}}"
    lines.append(fmt.format(*header))
    lines.append(fmt.format(*("-" * w for w in widths), "-" * len(header[3])))
    lines.extend(fmt.format(*row) for row in rows)
    lines.append("")
    n_failed = sum(not c.passed for c in report.checks)
    if report.ok:
        lines.append(f"All {len(report.checks)} checks passed.")
    else:
        lines.append(f"{n_failed} of {len(report.checks)} checks FAILED.")
    return "\n".join(lines)
