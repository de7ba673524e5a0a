"""The mechanisms behind the bad-input battery (tests/test_bad_inputs.py), tested without the
CLI table: the XML allow-list covers OpenMM, the package reads files only through the safe
loaders, atomic writes clean up after killed writers and rescue failed writes, device files
are never outputs, and interrupts and bugs leave through the one exit path."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import openmm
import pytest


def test_every_standard_openmm_type_is_allowed_and_pythonforce_is_not():
    import inspect

    from openmm_flowforce.safety import SAFE_XML_TYPES

    bases = (openmm.Force, openmm.Integrator, openmm.TabulatedFunction)
    classes = {name for name, cls in vars(openmm).items()
               if inspect.isclass(cls) and issubclass(cls, bases) and cls not in bases}
    assert classes - {"PythonForce"} <= SAFE_XML_TYPES
    assert "PythonForce" not in SAFE_XML_TYPES


def test_the_package_reads_files_only_through_the_safe_loaders():
    """No XML deserialisation outside safety.py, no unrestricted unpickling, no eval."""
    repo = Path(__file__).resolve().parents[1]
    root = repo / "openmm_flowforce"
    problems = []
    for path in sorted([*root.rglob("*.py"), *(repo / "bench").rglob("*.py")]):
        text = path.read_text()
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.relative_to(repo).as_posix()
        for number, line in enumerate(text.splitlines(), 1):
            code = line.split("#")[0]
            if "XmlSerializer.deserialize" in code and name != "safety.py" and "``" not in line:
                problems.append(f"{name}:{number}: XmlSerializer.deserialize outside safety.py")
            if "torch.load(" in code and "weights_only=True" not in code:
                problems.append(f"{name}:{number}: torch.load without weights_only=True")
            if "np.load(" in code and "allow_pickle=False" not in code:
                problems.append(f"{name}:{number}: np.load without allow_pickle=False")
            for call in re.findall(r"pickle\.loads?\(|yaml\.(?:unsafe_)?load\(|(?<![\w.])(?:eval|exec)\(", code):
                problems.append(f"{name}:{number}: {call}")
    assert not problems, "\n".join(problems)


def test_temporaries_of_killed_writers_are_removed(tmp_path):
    from openmm_flowforce.io import atomic_write_bytes

    target = tmp_path / "result.npz"
    # A real process that dies (SIGKILL) in the middle of an atomic write.
    child = ("import os, signal; from pathlib import Path; from openmm_flowforce.io import _temporary_path;"
             f"t = _temporary_path(Path({str(target)!r})); open(t, 'wb').write(b'half');"
             "os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", child], timeout=60).returncode == -signal.SIGKILL
    leftovers = list(tmp_path.glob(".result.npz.*.tmp"))
    assert len(leftovers) == 1
    legacy = tmp_path / ".result.npz.abcd1234.tmp"  # an older version's name, two hours old
    legacy.write_bytes(b"old")
    os.utime(legacy, (time.time() - 7200, time.time() - 7200))
    from openmm_flowforce.io import _temporary_path

    live = _temporary_path(target)  # this process's: alive, so kept
    live.write_bytes(b"mine")
    atomic_write_bytes(target, b"data")
    assert target.read_bytes() == b"data"
    assert sorted(tmp_path.iterdir()) == sorted([target, live])


def test_a_failed_write_keeps_the_result_and_says_where(tmp_path):
    from openmm_flowforce.errors import WriteFailedError
    from openmm_flowforce.io import atomic_write_bytes

    blocker = tmp_path / "gone"
    blocker.write_text("the output folder was replaced by a file during the run")
    with pytest.raises(WriteFailedError, match="saved to") as info:
        atomic_write_bytes(blocker / "result.bin", b"hours of work")
    rescued = Path(str(info.value).split("saved to ")[1].split(" instead")[0])
    try:
        assert rescued.read_bytes() == b"hours of work"
        assert info.value.exit_code == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["gone"]
    finally:
        rescued.unlink(missing_ok=True)


def test_device_files_are_never_outputs():
    from openmm_flowforce.errors import OutputError
    from openmm_flowforce.io import check_outputs

    with pytest.raises(OutputError, match="not a regular file"):
        check_outputs({"--out": "/dev/null"})


def test_interrupts_and_bugs_at_the_one_exit_path(tmp_path, capsys, monkeypatch):
    from openmm_flowforce.cli import main as cli

    def interrupted(args):
        raise KeyboardInterrupt

    def buggy(args):
        return len(None)  # a TypeError: a bug, not bad input

    for name, run in (("interrupted", interrupted), ("buggy", buggy)):
        monkeypatch.setitem(cli.SUBCOMMANDS, name, cli.Subcommand("test command", lambda parser: None, run))
    assert cli.main(["interrupted"]) == 130
    assert "interrupted (Ctrl-C); nothing was written" in capsys.readouterr().err
    with pytest.raises(TypeError):
        cli.main(["buggy"])
