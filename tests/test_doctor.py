"""``flowforce doctor`` and the CLI: real OpenMM Contexts on Reference and CPU."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from openmm_flowforce.md import doctor

REPO_ROOT = Path(__file__).resolve().parents[1]
CPU_PLATFORMS = ["Reference", "CPU"]


def _flowforce_command() -> list[str]:
    """The installed ``flowforce`` script next to this interpreter, else ``python -m``."""
    script = Path(sys.executable).parent / "flowforce"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "openmm_flowforce.cli.main"]


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # Lets the `python -m` fallback import the package from this checkout when not installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [*_flowforce_command(), *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )


def _backend_checks(report):
    """The per-platform backend rows (the native plugin's load check has platform '-')."""
    return [c for c in report.checks if c.name != "native-plugin"]


def test_every_check_passes_on_reference_and_cpu():
    from openmm_flowforce.export.native import native_build_info

    report = doctor.run_doctor(platforms=CPU_PLATFORMS)
    rows = {(c.name, c.platform): c for c in _backend_checks(report)}
    assert set(rows) == {(name, p) for name in ("torchforce", "pythonforce") for p in CPU_PLATFORMS}
    # A plugin that was built must load; one that was not built is information, not a row.
    plugin = [c for c in report.checks if c.name == "native-plugin"]
    assert len(plugin) == (1 if native_build_info().get("status") == "built" else 0)
    failed = [f"{c.name}/{c.platform}: {c.detail}" for c in report.checks if not c.passed]
    assert not failed, failed
    assert report.ok


def test_wrong_expected_energy_is_reported_as_fail():
    def doubled(positions: np.ndarray) -> float:
        return 2.0 * doctor.toy_energy(positions)

    report = doctor.run_doctor(platforms=["Reference"], expected_energy=doubled)
    checks = _backend_checks(report)
    assert len(checks) == 2
    assert all(not c.passed for c in checks)
    assert all("energy" in c.detail for c in checks)
    assert not report.ok
    assert "FAIL" in doctor.format_report(report)


def test_wrong_expected_forces_is_reported_as_fail():
    # The sign convention matters: F = −∇E; +2r is the gradient, not the force.
    report = doctor.run_doctor(platforms=["Reference"], expected_forces=lambda r: 2.0 * r)
    checks = _backend_checks(report)
    assert [c.passed for c in checks] == [False, False]
    assert all("forces differ" in c.detail for c in checks)


def test_missing_openmmtorch_fails_torchforce_only(monkeypatch):
    monkeypatch.setitem(sys.modules, "openmmtorch", None)  # makes `import openmmtorch` raise ImportError
    report = doctor.run_doctor(platforms=["Reference"])
    status = {c.name: c for c in report.checks}
    assert not status["torchforce"].passed
    assert "acellera-openmmtorch-cu13==1.10" in status["torchforce"].detail
    assert status["pythonforce"].passed
    assert not report.ok


@pytest.mark.parametrize(
    "message",
    [
        "no interpreter set",
        "/lib/libOpenMMTorch.so: undefined symbol: _ZN5torch3jit6Module",
    ],
)
def test_abi_mismatch_errors_get_the_install_hint(message):
    explained = doctor.explain_error("torchforce", RuntimeError(message))
    assert message.split(":")[-1].strip() in explained
    assert 'pip install "torch>=2.10,<2.13" acellera-openmmtorch-cu13==1.10' in explained


def test_gpu_library_missing_is_summarised_as_information():
    failures = [
        "Error loading library /x/plugins/libOpenMMCUDA.so: libcuda.so.1: cannot open shared object file",
        "Error loading library /x/plugins/libOpenMMTorchCUDA.so: libcuda.so.1: cannot open shared object file",
    ]
    (line,) = doctor.summarise_plugin_failures(failures)
    assert "OpenMMCUDA, OpenMMTorchCUDA" in line
    assert "expected on CPU-only machines" in line


def test_unknown_platform_names_the_alternatives():
    with pytest.raises(ValueError, match="Reference"):
        doctor.run_doctor(platforms=["NoSuchPlatform"])


def test_cli_doctor_exits_zero():
    result = _run_cli("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checks passed." in result.stdout


def test_cli_doctor_json_is_machine_readable():
    result = _run_cli("doctor", "--json", "--platform", "Reference")
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] is True
    assert {c["name"] for c in data["checks"]} - {"native-plugin"} == {"torchforce", "pythonforce"}
    assert all(c["status"] == "PASS" for c in data["checks"])


def test_cli_help_lists_subcommands():
    from openmm_flowforce.cli.main import SUBCOMMANDS

    result = _run_cli("--help")
    assert result.returncode == 0, result.stderr
    for name in SUBCOMMANDS:
        assert name in result.stdout
    unknown = _run_cli("no-such-command")
    assert unknown.returncode == 2
    assert "doctor" in unknown.stderr  # argparse lists the valid choices


def test_cli_version():
    from openmm_flowforce import __version__

    result = _run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"flowforce {__version__}"


def test_console_script_is_installed():
    # Look only in this interpreter's site-packages: an editable install leaves an
    # openmm_flowforce.egg-info in the checkout, which importlib.metadata would find via cwd.
    site = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    if not list(importlib.metadata.distributions(name="openmm_flowforce", path=sorted(site))):
        pytest.skip("openmm_flowforce is not installed in this environment (pip install -e .)")
    assert (Path(sys.executable).parent / "flowforce").exists()


def test_package_import_is_light():
    code = "import sys, openmm_flowforce, openmm_flowforce.md, openmm_flowforce.cli.main; " \
           "print(sorted(m for m in ('torch', 'openmm', 'openmmtorch') if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
