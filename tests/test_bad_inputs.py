"""The bad-input battery: every subcommand and public loader against the classes of
mistakes, faults and attacks of issue 10, on real files, real OpenMM, no mocks.

Classes: (1) files that would run code when read, (2) outputs that would destroy inputs or
cannot be written, (3) empty, truncated, corrupt and wrong-kind files and out-of-range
options, (4) interruptions and bugs. Every refusal must end with the exit status named in
the table, one line on stderr that names the file or option, no traceback, and the
working folder exactly as it was (no output, no partial or temporary file, no input
changed). ``CASES`` only uses ``openmm_flowforce.cli.main.main``, so the same table can be
run against an older checkout to count what it handled (BENCHMARKS.md, "Reliability";
``FLOWFORCE_BATTERY_LOOSE_NAMES=1`` for the lenient count).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openmm
import pytest

from openmm_flowforce.cli.main import main

#: The file the payloads below would create if any of them ran.
MARKER_NAME = "PAYLOAD_RAN"
#: FLOWFORCE_BATTERY_LOOSE_NAMES=1 accepts a message that names a flag in its Python
#: spelling (``time_ns`` for ``--time-ns``): used only to count what older versions handled.
LOOSE_NAMES = os.environ.get("FLOWFORCE_BATTERY_LOOSE_NAMES") == "1"


class _Payload:
    """An OpenMM PythonForce computation whose *unpickling* creates ``marker`` — what an
    attacker would put in a file. Called, it is a valid zero force."""

    def __init__(self, marker: Path, n_atoms: int):
        self.marker, self.n_atoms = str(marker), n_atoms

    def __call__(self, state):
        return 0.0, np.zeros((self.n_atoms, 3))

    def __reduce__(self):
        code = (f"(open({self.marker!r}, 'w').close(), "
                f"lambda state: (0.0, __import__('numpy').zeros(({self.n_atoms}, 3))))[1]")
        return eval, (code,)


def _with_payload(system_xml: str, marker: Path, nested: bool = False) -> str:
    """``system_xml`` plus a PythonForce carrying :class:`_Payload` (inside a CustomCVForce
    when ``nested``), serialised by OpenMM itself."""
    system = openmm.XmlSerializer.deserialize(system_xml)
    force = openmm.PythonForce(_Payload(marker, system.getNumParticles()))
    if nested:
        cv = openmm.CustomCVForce("0*x")
        cv.addCollectiveVariable("x", force)
        force = cv
    system.addForce(force)
    return openmm.XmlSerializer.serialize(system)


def _snapshot(folder: Path) -> dict[str, str]:
    """Name → sha256 of every file below ``folder`` (symlinks by target name)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            out[key] = "->" + os.readlink(path)
        elif path.is_file():
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[key] = "dir" if path.is_dir() else "special"
    return out


def _run(argv: list[str], capsys) -> tuple[int, str]:
    """``main(argv)`` in-process: its exit status and stderr ("Traceback" when it raised)."""
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse in versions whose main() did not catch it
        code = stop.code if isinstance(stop.code, int) else 2
    except BaseException as error:  # noqa: BLE001 - a traceback is a failure of the battery
        captured = capsys.readouterr()
        return -1, captured.err + f"\nTraceback: {type(error).__name__}: {error}"
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with one real file of every kind the package reads, made by the CLI
    (tiny sizes), plus empty, truncated, corrupt, wrong-kind and malicious variants."""
    d = tmp_path_factory.mktemp("bad_inputs")
    marker = d / MARKER_NAME
    assert main(["md", "--time-ns", "0.004", "--save-every-ps", "0.2", "--equilibration-ps", "0.1",
                 "--out", str(d / "ala.npz"), "--dcd", str(d / "ala.dcd"), "--no-progress"]) == 0
    (d / "tiny.yaml").write_text("flow: {n_layers: 1, hidden: [8], n_components: 2}\n")
    assert main(["train", str(d / "ala.npz"), "--out", str(d / "m.ckpt"), "--steps", "2", "--batch-size", "8",
                 "--config", str(d / "tiny.yaml"), "--quiet"]) == 0
    (d / "s.yaml").write_text("options: {n_layers: 1, hidden: 8, n_components: 2, batch_size: 8, steps: 2}\n")
    assert main(["sampler", "train", "--target", "dw4", "--method", "reverse-kl", "--out", str(d / "s.ckpt"),
                 "--config", str(d / "s.yaml"), "--quiet"]) == 0
    assert main(["sampler", "sample", str(d / "s.ckpt"), "-n", "40", "--out", str(d / "ref.npy")]) == 0
    from openmm_flowforce.coordinates.cg_mapping import CGMapping
    from openmm_flowforce.data import alanine_dipeptide_pdb
    from openmm_flowforce.data.dataset import load_dataset

    shutil.copy(alanine_dipeptide_pdb(), d / "ala.pdb")
    # a CG trajectory and topology (5 backbone beads) that `flowforce evaluate` accepts
    data = load_dataset(d / "ala.npz")
    mapping = CGMapping.from_topology(data.topology, "backbone")
    beads = np.asarray(mapping.map_positions(data.positions.astype(np.float64)))
    mapping.write_pdb(d / "cg.pdb", beads[0])
    with open(d / "cg.dcd", "wb") as handle:
        dcd = openmm.app.DCDFile(handle, openmm.app.PDBFile(str(d / "cg.pdb")).topology, 0.001)
        for frame in beads:
            dcd.writeModel(frame * openmm.unit.nanometer)
    assert main(["evaluate", str(d / "cg.dcd"), "--topology", str(d / "cg.pdb"), "--reference", str(d / "ala.npz"),
                 "--out", str(d / "report.json")]) == 0
    # empty, truncated, garbage and wrong-kind files
    for name in ("empty.ckpt", "empty.npz", "empty.pt", "empty.dcd", "empty.pdb", "empty.npy", "empty.xml"):
        (d / name).write_bytes(b"")
    data = (d / "m.ckpt").read_bytes()
    (d / "half.ckpt").write_bytes(data[: len(data) // 2])
    (d / "half.npz").write_bytes((d / "ala.npz").read_bytes()[:3000])
    (d / "garbage.ckpt").write_bytes(os.urandom(4096))
    (d / "garbage.pt").write_bytes(os.urandom(4096))
    (d / "garbage.dcd").write_bytes(os.urandom(4096))
    (d / "garbage.pdb").write_bytes(os.urandom(2048))
    (d / "notes.txt").write_text("these are notes, not data\n")
    np.save(d / "wrong_shape.npy", np.zeros((50, 3)))
    np.save(d / "nan.npy", np.full((50, 8), np.nan))
    np.savez(d / "ref_as.npz", x=np.zeros((50, 8)))
    np.save(d / "objects.npy", np.array([_Payload(marker, 1), 1], dtype=object), allow_pickle=True)
    np.savez(d / "foreign.npz", a=np.arange(3))
    import torch

    torch.save(_Payload(marker, 1), d / "pickled_object.ckpt")
    # configs
    configs = {
        "bad_yaml.yaml": "flow: {n_layers: [1\n", "list.yaml": "- 1\n- 2\n",
        "str_components.yaml": "flow: {n_components: 'x'}\n", "zero_hidden.yaml": "flow: {hidden: 0}\n",
        "neg_loss.yaml": "loss: {nll: -1}\n", "zero_epochs.yaml": "epochs: 0\n", "big_val.yaml": "val_fraction: 2\n",
        "zero_batch.yaml": "train: {batch_size: 0}\n", "unknown.yaml": "epoch: 3\n",
        "cg_steps.yaml": "flow_train: {steps: 0}\n", "cg_net.yaml": "net: {hidden: [0]}\n",
        "cg_loss.yaml": "cg_loss: {kind: polar}\n", "cg_weights.yaml": "cg_loss: {weights: {dihedral: 1}}\n",
        "cg_jitter.yaml": "torsion_jitter: {fraction: -0.5}\n", "cg_ensemble.yaml": "flow_ensemble: 0\n",
        "cg_energy_fm.yaml": "cg_loss: {energy_weight: 1.0}\n", "cg_prior_factor.yaml": "prior_outlier_factor: 0\n",
        "cg_huber.yaml": "cg_loss: {huber: -1}\n", "cg_contact.yaml": "contact_factor: 0\n",
        "s_steps.yaml": "options: {steps: 'x'}\n", "s_lr.yaml": "options: {lr: -1}\n",
        "s_target.yaml": "target_options: {bogus: 1}\n", "s_ais.yaml": "options: {ais_space: internal}\n", "python_tag.yaml": "epochs: !!python/object/apply:os.getcwd []\n",
    }
    for name, text in configs.items():
        (d / name).write_text(text)
    (d / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage\x80")
    # malicious files: a model and a dataset whose reference System holds a PythonForce payload,
    # force fields that run scripts
    ckpt = torch.load(d / "m.ckpt", weights_only=True)
    ckpt["metadata"]["system_xml"] = _with_payload(ckpt["metadata"]["system_xml"], marker)
    torch.save(ckpt, d / "evil.ckpt")
    with np.load(d / "ala.npz", allow_pickle=False) as f:
        arrays = dict(f)
    arrays["system_xml"] = np.array(_with_payload(str(arrays["system_xml"]), marker, nested=True))
    np.savez(d / "evil.npz", **arrays)
    touch = f"open({str(marker)!r}, 'w').close()"
    (d / "evil_init.xml").write_text(f"<ForceField>\n<InitializationScript>{touch}</InitializationScript>\n"
                                     "</ForceField>\n")
    (d / "evil_script.xml").write_text(f"<ForceField>\n<Script>{touch}</Script>\n</ForceField>\n")
    (d / "evil_eval.xml").write_text(f'<ForceField>\n<NonbondedForce coulomb14scale="0.8" lj14scale="0.5" '
                                     f'useDispersionCorrection="{touch} or True"/>\n</ForceField>\n')
    (d / "evil_include.xml").write_text('<ForceField>\n<Include file="evil_init.xml"/>\n</ForceField>\n')
    os.symlink("m.ckpt", d / "link.ckpt")  # an output that is a symlink to an input
    os.mkdir(d / "folder")
    assert not marker.exists()
    return d


@pytest.fixture
def case(work, tmp_path) -> Path:
    """A fresh copy of ``work`` for one case, so that a case that does damage (in an older
    version) cannot spoil the next; the payloads' marker is looked for in both folders."""
    d = tmp_path / "case"
    shutil.copytree(work, d, symlinks=True)
    os.link(d / "ala.npz", d / "hardlink.npz")  # an output that is a hard link to an input
    os.mkfifo(d / "pipe")  # made per case: copying a pipe would block
    yield d
    (work / MARKER_NAME).unlink(missing_ok=True)


def _case(id_: str, argv: str, code: int, *mentions: str):
    return pytest.param(argv, code, mentions, id=id_)


#: (command line with {d} for the work folder, exit status, what the message must name).
CASES = [
    # -- 1. no code from files -------------------------------------------------------------
    _case("sample-reweight-pythonforce-in-checkpoint", "sample {d}/evil.ckpt -n 4 --reweight --out {d}/o.npz", 2,
          "evil.ckpt", "PythonForce", "--trust"),
    _case("train-dataset-with-pythonforce", "train {d}/evil.npz --out {d}/o.ckpt --steps 1", 2,
          "evil.npz", "PythonForce"),
    _case("cg-dataset-with-pythonforce", "cg {d}/evil.npz --out {d}/o.ckpt --quick --quiet", 2, "evil.npz"),
    _case("evaluate-reference-with-pythonforce",
          "evaluate {d}/cg.dcd --topology {d}/cg.pdb --reference {d}/evil.npz --out {d}/o.json", 2, "evil.npz"),
    _case("md-forcefield-initialization-script", "md --pdb {d}/ala.pdb --forcefield {d}/evil_init.xml "
          "--out {d}/o.npz", 2, "evil_init.xml", "InitializationScript"),
    _case("md-forcefield-script", "md --pdb {d}/ala.pdb --forcefield amber14-all.xml {d}/evil_script.xml "
          "--out {d}/o.npz", 2, "evil_script.xml", "Script"),
    _case("md-forcefield-eval-attribute", "md --pdb {d}/ala.pdb --forcefield {d}/evil_eval.xml --out {d}/o.npz", 2,
          "evil_eval.xml", "useDispersionCorrection"),
    _case("md-forcefield-include", "md --pdb {d}/ala.pdb --forcefield {d}/evil_include.xml --out {d}/o.npz", 2,
          "evil_init.xml"),
    _case("sample-pickled-object-checkpoint", "sample {d}/pickled_object.ckpt -n 4 --out {d}/o.npz", 2,
          "pickled_object.ckpt"),
    _case("sampler-evaluate-pickled-reference", "sampler evaluate {d}/s.ckpt --reference {d}/objects.npy -n 10 "
          "--no-align --out {d}/o.json", 2, "objects.npy"),
    # -- 2. never destroy inputs; outputs checked before the work -------------------------------
    _case("export-out-is-input", "export {d}/m.ckpt --out {d}/m.ckpt", 2, "m.ckpt", "--out"),
    _case("sample-out-is-input", "sample {d}/m.ckpt -n 4 --out {d}/m.ckpt", 2, "m.ckpt", "--out"),
    _case("sample-out-is-symlink-to-input", "sample {d}/m.ckpt -n 4 --out {d}/link.ckpt", 2, "link.ckpt"),
    _case("evaluate-out-is-input", "evaluate {d}/cg.dcd --topology {d}/cg.pdb --reference {d}/ala.npz "
          "--out {d}/cg.dcd", 2, "cg.dcd", "--out"),
    _case("evaluate-plot-is-input", "evaluate {d}/cg.dcd --topology {d}/cg.pdb --reference {d}/ala.npz "
          "--out {d}/o.json --plot {d}/cg.pdb", 2, "cg.pdb", "--plot"),
    _case("train-out-is-data", "train {d}/ala.npz --out {d}/ala.npz", 2, "ala.npz"),
    _case("train-out-is-hardlink-to-data", "train {d}/ala.npz --out {d}/hardlink.npz", 2, "hardlink.npz"),
    _case("train-log-is-data", "train {d}/ala.npz --out {d}/o.ckpt --log {d}/ala.npz", 2, "--log", "ala.npz"),
    _case("train-log-is-config", "train {d}/ala.npz --out {d}/o.ckpt --config {d}/tiny.yaml --log {d}/tiny.yaml", 2,
          "tiny.yaml"),
    _case("md-out-equals-dcd", "md --out {d}/o.npz --dcd {d}/o.npz", 2, "o.npz", "--dcd"),
    _case("md-out-is-pdb-input", "md --pdb {d}/ala.pdb --out {d}/ala.pdb", 2, "ala.pdb"),
    _case("simulate-out-is-topology", "simulate {d}/m.ckpt --topology {d}/ala.pdb --steps 10 --out {d}/ala.pdb", 2,
          "ala.pdb"),
    _case("simulate-report-is-model", "simulate {d}/m.ckpt --topology {d}/ala.pdb --steps 10 --out {d}/o.dcd "
          "--report {d}/m.ckpt", 2, "--report"),
    _case("cg-out-is-data", "cg {d}/ala.npz --out {d}/ala.npz --quick --quiet", 2, "ala.npz"),
    _case("sampler-sample-out-is-checkpoint", "sampler sample {d}/s.ckpt -n 4 --out {d}/s.ckpt", 2, "s.ckpt"),
    _case("sampler-evaluate-out-is-reference", "sampler evaluate {d}/s.ckpt --reference {d}/ref.npy -n 10 "
          "--out {d}/ref.npy", 2, "ref.npy"),
    _case("sampler-train-log-is-config", "sampler train --target dw4 --method reverse-kl --out {d}/o.ckpt "
          "--config {d}/s.yaml --log {d}/s.yaml", 2, "s.yaml"),
    _case("md-parent-is-a-file", "md --out {d}/ala.npz/o.npz", 2, "ala.npz"),
    _case("train-parent-is-a-file", "train {d}/ala.npz --out {d}/m.ckpt/o.ckpt --steps 1", 2, "m.ckpt"),
    _case("sample-out-is-a-folder", "sample {d}/m.ckpt -n 4 --out {d}/folder", 2, "folder"),
    _case("export-out-is-a-folder", "export {d}/m.ckpt --out {d}/folder", 2, "folder"),
    # A named pipe, not /dev/null: a version without the check replaces the special file
    # with a regular one (as root it really did replace /dev/null).
    _case("sample-out-is-a-pipe", "sample {d}/m.ckpt -n 4 --out {d}/pipe", 2, "pipe", "not a regular file"),
    _case("demo-out-is-a-file", "demo --quick --out {d}/notes.txt", 2, "notes.txt"),
    # -- 3. clear errors: empty, truncated, corrupt, wrong-kind files -----------------------------
    _case("sample-empty-checkpoint", "sample {d}/empty.ckpt -n 4 --out {d}/o.npz", 2, "empty.ckpt", "empty"),
    _case("export-empty-checkpoint", "export {d}/empty.ckpt --out {d}/o.pt", 2, "empty.ckpt"),
    _case("simulate-empty-checkpoint", "simulate {d}/empty.ckpt --topology {d}/ala.pdb --steps 10 --out {d}/o.dcd",
          2, "empty.ckpt"),
    _case("simulate-empty-pt", "simulate {d}/empty.pt --topology {d}/ala.pdb --steps 10 --out {d}/o.dcd", 2,
          "empty.pt"),
    _case("simulate-garbage-pt", "simulate {d}/garbage.pt --topology {d}/ala.pdb --steps 10 --out {d}/o.dcd", 2,
          "garbage.pt"),
    _case("simulate-dcd-as-model", "simulate {d}/ala.dcd --topology {d}/ala.pdb --steps 10 --out {d}/o.dcd", 2,
          "ala.dcd"),
    _case("sampler-sample-empty-checkpoint", "sampler sample {d}/empty.ckpt -n 4 --out {d}/o.npy", 2, "empty.ckpt"),
    _case("sampler-evaluate-empty-checkpoint", "sampler evaluate {d}/empty.ckpt --reference {d}/ref.npy -n 10 "
          "--out {d}/o.json", 2, "empty.ckpt"),
    _case("train-resume-from-empty-out", "train {d}/ala.npz --out {d}/empty.ckpt --steps 1", 2, "empty.ckpt"),
    _case("train-resume-from-sampler-checkpoint", "train {d}/ala.npz --out {d}/s.ckpt --steps 1 "
          "--config {d}/tiny.yaml", 2, "s.ckpt", "sampler"),
    _case("train-resume-other-architecture", "train {d}/ala.npz --out {d}/m.ckpt --steps 3", 2, "m.ckpt",
          "other options"),
    _case("sampler-train-resume-from-empty", "sampler train --target dw4 --method reverse-kl --out {d}/empty.ckpt "
          "--config {d}/s.yaml", 2, "empty.ckpt"),
    _case("sample-truncated-checkpoint", "sample {d}/half.ckpt -n 4 --out {d}/o.npz", 2, "half.ckpt"),
    _case("export-truncated-checkpoint", "export {d}/half.ckpt --out {d}/o.pt", 2, "half.ckpt"),
    _case("sample-garbage-checkpoint", "sample {d}/garbage.ckpt -n 4 --out {d}/o.npz", 2, "garbage.ckpt"),
    _case("sample-dataset-as-checkpoint", "sample {d}/ala.npz -n 4 --out {d}/o.npz", 2, "ala.npz"),
    _case("sample-sampler-checkpoint", "sample {d}/s.ckpt -n 4 --out {d}/o.npz", 2, "s.ckpt", "sampler"),
    _case("sampler-sample-model-checkpoint", "sampler sample {d}/m.ckpt -n 4 --out {d}/o.npy", 2, "m.ckpt"),
    _case("train-empty-dataset", "train {d}/empty.npz --out {d}/o.ckpt", 2, "empty.npz"),
    _case("train-truncated-dataset", "train {d}/half.npz --out {d}/o.ckpt", 2, "half.npz"),
    _case("train-checkpoint-as-dataset", "train {d}/m.ckpt --out {d}/o.ckpt", 2, "m.ckpt"),
    _case("train-foreign-npz", "train {d}/foreign.npz --out {d}/o.ckpt", 2, "foreign.npz"),
    _case("train-npy-as-dataset", "train {d}/ref.npy --out {d}/o.ckpt", 2, "ref.npy"),
    _case("cg-empty-dataset", "cg {d}/empty.npz --out {d}/o.ckpt --quick --quiet", 2, "empty.npz"),
    _case("evaluate-empty-trajectory", "evaluate {d}/empty.dcd --topology {d}/cg.pdb --reference {d}/ala.npz "
          "--out {d}/o.json", 2, "empty.dcd"),
    _case("evaluate-garbage-trajectory", "evaluate {d}/garbage.dcd --topology {d}/cg.pdb --reference {d}/ala.npz "
          "--out {d}/o.json", 2, "garbage.dcd"),
    _case("evaluate-empty-topology", "evaluate {d}/cg.dcd --topology {d}/empty.pdb --reference {d}/ala.npz "
          "--out {d}/o.json", 2, "empty.pdb"),
    _case("evaluate-reference-is-checkpoint", "evaluate {d}/cg.dcd --topology {d}/cg.pdb --reference {d}/m.ckpt "
          "--out {d}/o.json", 2, "m.ckpt"),
    _case("simulate-empty-topology", "simulate {d}/m.ckpt --topology {d}/empty.pdb --steps 10 --out {d}/o.dcd", 2,
          "empty.pdb"),
    _case("simulate-garbage-topology", "simulate {d}/m.ckpt --topology {d}/garbage.pdb --steps 10 --out {d}/o.dcd",
          2, "garbage.pdb"),
    _case("sampler-evaluate-wrong-shape-reference", "sampler evaluate {d}/s.ckpt --reference {d}/wrong_shape.npy "
          "-n 10 --out {d}/o.json", 2, "wrong_shape.npy", "(50, 3)"),
    _case("sampler-evaluate-npz-reference", "sampler evaluate {d}/s.ckpt --reference {d}/ref_as.npz -n 10 "
          "--out {d}/o.json", 2, "ref_as.npz"),
    _case("sampler-evaluate-nan-reference", "sampler evaluate {d}/s.ckpt --reference {d}/nan.npy -n 10 "
          "--out {d}/o.json", 2, "nan.npy"),
    _case("sampler-evaluate-empty-reference", "sampler evaluate {d}/s.ckpt --reference {d}/empty.npy -n 10 "
          "--out {d}/o.json", 2, "empty.npy"),
    _case("sample-missing-model", "sample {d}/missing.ckpt -n 4 --out {d}/o.npz", 2, "missing.ckpt"),
    _case("md-empty-forcefield", "md --pdb {d}/ala.pdb --forcefield {d}/empty.xml --out {d}/o.npz", 2, "empty.xml"),
    # -- 3. clear errors: YAML configs (the same rules as the flags) ------------------------------
    _case("config-invalid-yaml", "train {d}/ala.npz --out {d}/o.ckpt --config {d}/bad_yaml.yaml", 2, "bad_yaml.yaml"),
    _case("config-not-a-mapping", "train {d}/ala.npz --out {d}/o.ckpt --config {d}/list.yaml", 2, "list.yaml"),
    _case("config-binary", "train {d}/ala.npz --out {d}/o.ckpt --config {d}/binary.yaml", 2, "binary.yaml"),
    _case("config-python-tag", "train {d}/ala.npz --out {d}/o.ckpt --config {d}/python_tag.yaml", 2,
          "python_tag.yaml"),
    _case("config-missing", "train {d}/ala.npz --out {d}/o.ckpt --config {d}/missing.yaml", 2, "missing.yaml"),
    _case("config-folder", "train {d}/ala.npz --out {d}/o.ckpt --config {d}/folder", 2, "folder"),
    _case("config-n-components-string", "train {d}/ala.npz --out {d}/o.ckpt --config {d}/str_components.yaml", 2,
          "n_components", "'x'"),
    _case("config-hidden-zero", "train {d}/ala.npz --out {d}/o.ckpt --config {d}/zero_hidden.yaml", 2,
          "hidden", "0"),
    _case("config-negative-loss-weight", "train {d}/ala.npz --out {d}/o.ckpt --config {d}/neg_loss.yaml", 2,
          "nll", "-1"),
    _case("config-zero-epochs", "train {d}/ala.npz --out {d}/o.ckpt --config {d}/zero_epochs.yaml", 2, "epochs"),
    _case("config-val-fraction-2", "train {d}/ala.npz --out {d}/o.ckpt --config {d}/big_val.yaml", 2,
          "val_fraction", "2"),
    _case("config-batch-zero", "train {d}/ala.npz --out {d}/o.ckpt --config {d}/zero_batch.yaml", 2, "batch_size"),
    _case("config-unknown-key", "train {d}/ala.npz --out {d}/o.ckpt --config {d}/unknown.yaml", 2, "epoch"),
    _case("cg-config-zero-steps", "cg {d}/ala.npz --out {d}/o.ckpt --config {d}/cg_steps.yaml", 2, "steps"),
    _case("cg-config-hidden-zero", "cg {d}/ala.npz --out {d}/o.ckpt --config {d}/cg_net.yaml", 2, "hidden"),
    _case("cg-config-loss-kind", "cg {d}/ala.npz --out {d}/o.ckpt --config {d}/cg_loss.yaml", 2, "kind"),
    _case("cg-config-loss-weight-kind", "cg {d}/ala.npz --out {d}/o.ckpt --config {d}/cg_weights.yaml", 2, "dihedral"),
    _case("cg-config-negative-jitter", "cg {d}/ala.npz --out {d}/o.ckpt --config {d}/cg_jitter.yaml", 2, "fraction"),
    _case("cg-config-zero-ensemble", "cg {d}/ala.npz --out {d}/o.ckpt --config {d}/cg_ensemble.yaml", 2,
          "flow_ensemble"),
    _case("cg-config-zero-prior-factor", "cg {d}/ala.npz --out {d}/o.ckpt --config {d}/cg_prior_factor.yaml", 2,
          "prior_outlier_factor"),
    _case("cg-config-zero-contact-factor", "cg {d}/ala.npz --out {d}/o.ckpt --config {d}/cg_contact.yaml", 2,
          "contact_factor"),
    _case("cg-config-negative-huber", "cg {d}/ala.npz --out {d}/o.ckpt --config {d}/cg_huber.yaml", 2, "huber"),
    _case("cg-energy-weight-force-matching", "cg {d}/ala.npz --out {d}/o.ckpt --method force-matching --quick "
          "--config {d}/cg_energy_fm.yaml", 2, "energy_weight"),
    _case("cg-optimal-force-map-flow-matching", "cg {d}/ala.npz --out {d}/o.ckpt --force-map optimal --quick", 2,
          "force_map"),
    _case("cg-unknown-force-map", "cg {d}/ala.npz --out {d}/o.ckpt --method force-matching --force-map best", 2,
          "--force-map", "best"),
    _case("sampler-config-steps-string", "sampler train --target dw4 --method reverse-kl --out {d}/o.ckpt "
          "--config {d}/s_steps.yaml", 2, "steps", "'x'"),
    _case("sampler-config-negative-lr", "sampler train --target dw4 --method reverse-kl --out {d}/o.ckpt "
          "--config {d}/s_lr.yaml", 2, "lr", "-1"),
    _case("sampler-config-unknown-target-option", "sampler train --target dw4 --method reverse-kl --out {d}/o.ckpt "
          "--config {d}/s_target.yaml", 2, "bogus"),
    _case("sampler-config-internal-ais-on-toy", "sampler train --target dw4 --method fab --out {d}/o.ckpt "
          "--config {d}/s_ais.yaml", 2, "ais_space", "flow: internal"),
    # -- 3. clear errors: flags -------------------------------------------------------------------
    _case("md-negative-friction", "md --friction-per-ps -1 --out {d}/o.npz", 2, "--friction-per-ps", "-1"),
    _case("md-zero-temperature", "md --temperature 0 --out {d}/o.npz", 2, "--temperature"),
    _case("md-nan-temperature", "md --temperature nan --out {d}/o.npz", 2, "--temperature", "nan"),
    _case("md-zero-time", "md --time-ns 0 --out {d}/o.npz", 2, "--time-ns"),
    _case("md-negative-timestep", "md --timestep-fs -1 --out {d}/o.npz", 2, "--timestep-fs"),
    _case("train-zero-epochs", "train {d}/ala.npz --out {d}/o.ckpt --epochs 0", 2, "--epochs", "0"),
    _case("train-zero-steps", "train {d}/ala.npz --out {d}/o.ckpt --steps 0", 2, "--steps"),
    _case("train-zero-batch", "train {d}/ala.npz --out {d}/o.ckpt --batch-size 0", 2, "--batch-size"),
    _case("train-negative-lr", "train {d}/ala.npz --out {d}/o.ckpt --lr -0.001", 2, "--lr", "-0.001"),
    _case("train-negative-loss-weight", "train {d}/ala.npz --out {d}/o.ckpt --loss nll=1,force=-1", 2, "force"),
    _case("sample-zero-n", "sample {d}/m.ckpt -n 0 --out {d}/o.npz", 2, "--n-samples"),
    _case("sample-zero-batch", "sample {d}/m.ckpt -n 4 --batch 0 --out {d}/o.npz", 2, "--batch"),
    _case("sample-negative-workers", "sample {d}/m.ckpt -n 4 --workers -1 --out {d}/o.npz", 2, "--workers"),
    _case("sample-n-not-a-number", "sample {d}/m.ckpt -n many --out {d}/o.npz", 2, "many"),
    _case("export-negative-temperature", "export {d}/m.ckpt --out {d}/o.pt --temperature -5", 2, "--temperature"),
    _case("simulate-zero-steps", "simulate {d}/m.ckpt --topology {d}/ala.pdb --steps 0 --out {d}/o.dcd", 2,
          "--steps"),
    _case("simulate-negative-friction", "simulate {d}/m.ckpt --topology {d}/ala.pdb --steps 10 --friction -1 "
          "--out {d}/o.dcd", 2, "--friction"),
    _case("simulate-zero-timestep", "simulate {d}/m.ckpt --topology {d}/ala.pdb --steps 10 --timestep-fs 0 "
          "--out {d}/o.dcd", 2, "--timestep-fs"),
    _case("simulate-zero-report-interval", "simulate {d}/m.ckpt --topology {d}/ala.pdb --steps 10 "
          "--report-interval 0 --out {d}/o.dcd", 2, "--report-interval"),
    _case("simulate-negative-seed", "simulate {d}/m.ckpt --topology {d}/ala.pdb --steps 10 --seed -1 "
          "--out {d}/o.dcd", 2, "--seed"),
    _case("evaluate-zero-bins", "evaluate {d}/cg.dcd --topology {d}/cg.pdb --reference {d}/ala.npz --bins 0 "
          "--out {d}/o.json", 2, "--bins"),
    _case("evaluate-negative-skip", "evaluate {d}/cg.dcd --topology {d}/cg.pdb --reference {d}/ala.npz "
          "--skip -1 --out {d}/o.json", 2, "--skip"),
    _case("evaluate-negative-pseudocount", "evaluate {d}/cg.dcd --topology {d}/cg.pdb --reference {d}/ala.npz "
          "--pseudocount -1 --out {d}/o.json", 2, "--pseudocount"),
    _case("cg-one-flow-sample", "cg {d}/ala.npz --out {d}/o.ckpt --flow-samples 1", 2, "--flow-samples"),
    _case("sampler-train-zero-steps", "sampler train --target dw4 --method reverse-kl --out {d}/o.ckpt --steps 0", 2,
          "--steps"),
    _case("sampler-sample-zero-n", "sampler sample {d}/s.ckpt -n 0 --out {d}/o.npy", 2, "--n-samples"),
    _case("sampler-evaluate-zero-n", "sampler evaluate {d}/s.ckpt --reference {d}/ref.npy -n 0 --out {d}/o.json", 2,
          "--n-samples"),
    _case("unknown-flag", "sample {d}/m.ckpt -n 4 --out {d}/o.npz --nsamples 3", 2, "--nsamples"),
    # -- trajectories read through mdtraj (train, cg, evaluate, convert) -------------------
    _case("convert-over-its-trajectory", "convert {d}/ala.dcd --topology {d}/ala.pdb --out {d}/ala.dcd", 2,
          "ala.dcd"),
    _case("convert-topology-of-other-atoms", "convert {d}/ala.dcd --topology {d}/cg.pdb --out {d}/o.npz", 2,
          "ala.dcd", "cg.pdb"),
    _case("convert-garbage-trajectory", "convert {d}/garbage.dcd --topology {d}/ala.pdb --out {d}/o.npz", 2,
          "garbage.dcd"),
    _case("convert-empty-trajectory", "convert {d}/empty.dcd --topology {d}/ala.pdb --out {d}/o.npz", 2,
          "empty.dcd"),
    _case("convert-garbage-topology", "convert {d}/ala.dcd --topology {d}/garbage.pdb --out {d}/o.npz", 2,
          "garbage.pdb"),
    _case("convert-zero-stride", "convert {d}/ala.dcd --topology {d}/ala.pdb --stride 0 --out {d}/o.npz", 2,
          "--stride"),
    _case("convert-bad-selection", "convert {d}/ala.dcd --topology {d}/ala.pdb --select foo --out {d}/o.npz",
          2, "selection"),
    _case("train-trajectory-without-topology", "train {d}/ala.dcd --out {d}/o.ckpt --steps 1", 2, "--topology"),
    _case("train-forces-of-other-shape", "train {d}/ala.dcd --topology {d}/ala.pdb --forces {d}/wrong_shape.npy "
          "--out {d}/o.ckpt --steps 1", 2, "wrong_shape.npy"),
    _case("cg-npz-with-trajectory-options", "cg {d}/ala.npz --topology {d}/ala.pdb --out {d}/o.ckpt --quick", 2,
          "--topology"),
    _case("evaluate-reference-trajectory-without-topology", "evaluate {d}/cg.dcd --topology {d}/cg.pdb "
          "--reference {d}/ala.dcd --out {d}/o.json", 2, "--topology"),
]


@pytest.mark.parametrize("argv, code, mentions", CASES)
def test_refused_in_one_line_with_nothing_changed(work, case, capsys, argv, code, mentions):
    before = _snapshot(case)
    got, err = _run(argv.format(d=case).split(), capsys)
    assert not (work / MARKER_NAME).exists() and not (case / MARKER_NAME).exists(), "the payload ran"
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert got == code, err
    assert len(lines) == 1, err
    for text in mentions:
        spellings = {text}
        if LOOSE_NAMES:  # also the Python spelling of a flag: time_ns for --time-ns
            spellings |= {text.lstrip("-"), text.lstrip("-").replace("-", "_")}
        assert any(spelling in lines[0] for spelling in spellings), lines[0]
    assert _snapshot(case) == before  # no output, no partial or temporary file, no input changed


# -- 1. no code from files: the API routes, and --trust ----------------------------------------

def test_api_loaders_refuse_code_and_trust_runs_it(work):
    from openmm_flowforce.data.dataset import load_dataset
    from openmm_flowforce.errors import UnsafeFileError
    from openmm_flowforce.openmm import load_system
    from openmm_flowforce.safety import check_xml, deserialize_xml

    marker = work / MARKER_NAME
    evil = _with_payload(str(np.load(work / "ala.npz")["system_xml"]), marker)
    (work / "api_evil.xml").write_text(evil)
    try:
        with pytest.raises(UnsafeFileError, match="PythonForce"):
            load_system(work / "api_evil.xml", work / "m.ckpt")
        with pytest.raises(UnsafeFileError, match="PythonForce"):
            load_dataset(work / "evil.npz")
        with pytest.raises(UnsafeFileError, match="PythonForce"):  # nested in a CustomCVForce
            check_xml(str(np.load(work / "evil.npz")["system_xml"]))
        with pytest.raises(UnsafeFileError, match="DOCTYPE"):
            check_xml('<!DOCTYPE x [<!ENTITY a "PythonForce">]><System type="System"/>')
        with pytest.raises(UnsafeFileError, match="does not know"):
            check_xml('<Integrator type="SomePluginIntegrator" version="1"/>')
        assert not marker.exists()
        # what is inert still loads: a State and an Integrator, with their types allowed
        assert isinstance(deserialize_xml(openmm.XmlSerializer.serialize(openmm.LangevinMiddleIntegrator(
            300, 1, 0.001))), openmm.LangevinMiddleIntegrator)
        # the payload is real: trusting the file runs it
        deserialize_xml(evil, trust=True)
        assert marker.exists()
    finally:
        marker.unlink(missing_ok=True)
        (work / "api_evil.xml").unlink()


def test_cli_trust_flag_runs_the_payload(work, capsys):
    marker = work / MARKER_NAME
    out = work / "trusted.npz"
    try:
        assert main(["sample", str(work / "evil.ckpt"), "-n", "4", "--reweight", "--out", str(out), "--trust"]) == 0
        assert marker.exists() and out.exists()
    finally:
        marker.unlink(missing_ok=True)
        out.unlink(missing_ok=True)


# -- 2. writes: a full disk, unwritable folders (the mechanisms: test_safe_io.py) -------------

def test_a_full_disk_while_writing_the_result_is_one_line_and_keeps_the_old_file(work, tmp_path):
    """A real fault: the process may write at most 8 kB per file (RLIMIT_FSIZE, so writes
    fail with EFBIG as on a full disk); the samples need more."""
    import resource

    out = tmp_path / "samples.npz"
    out.write_bytes(b"the previous result")

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    result = subprocess.run([sys.executable, "-m", "openmm_flowforce.cli.main", "sample", str(work / "m.ckpt"),
                             "-n", "200", "--out", str(out)], capture_output=True, text=True, timeout=120,
                            preexec_fn=limit_file_size)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"could not write {out}" in lines[0] and "File too large" in lines[0]
    assert out.read_bytes() == b"the previous result"
    assert sorted(tmp_path.iterdir()) == [out]


def test_unwritable_output_folder_is_refused_before_the_work(work, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        candidates = [locked, Path("/proc/1")]
        folder = next((c for c in candidates if c.is_dir() and not os.access(c, os.W_OK | os.X_OK)), None)
        if folder is None:
            pytest.skip("no unwritable folder here (root on a writable file system)")
        started = time.perf_counter()
        code, err = _run(["md", "--time-ns", "10", "--out", str(folder / "o.npz")], capsys)
        assert code == 2 and "not writable" in err and str(folder) in err
        assert time.perf_counter() - started < 30  # refused before 10 ns of MD
    finally:
        locked.chmod(0o700)


# -- 4. Ctrl-C and bugs -------------------------------------------------------------------------

def test_ctrl_c_during_train_saves_the_model_and_says_so(work, tmp_path):
    out = tmp_path / "long.ckpt"
    log = tmp_path / "long.jsonl"
    command = [sys.executable, "-m", "openmm_flowforce.cli.main", "train", str(work / "ala.npz"), "--out", str(out),
               "--steps", "1000000", "--batch-size", "8", "--config", str(work / "tiny.yaml"), "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (log.exists() and log.stat().st_size > 0) and time.time() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert log.exists(), process.communicate()[1]
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert "interrupted" in lines[0] and str(out) in lines[0] and "continue" in lines[0]
    import torch

    assert torch.load(out, weights_only=True)["step"] >= 10
    assert not list(tmp_path.glob(".*.tmp"))


def test_bad_input_exit_status_from_the_installed_command(work):
    result = subprocess.run([sys.executable, "-m", "openmm_flowforce.cli.main", "export", str(work / "empty.ckpt"),
                             "--out", str(work / "o.pt")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "empty.ckpt" in result.stderr
    assert not (work / "o.pt").exists()


