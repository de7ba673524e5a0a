"""Many independent MD replicas in parallel worker processes, written into one dataset.

A protein's folding equilibrium is not sampled by one trajectory of affordable length; many
short independent replicas from several starting structures are (the Markov-state-model
practice, e.g. Lindorff-Larsen, Piana, Dror, Shaw, Science 334, 517 (2011) for chignolin).
:class:`ReplicaPlan` describes such a run; :func:`run_missing_replicas` runs the replicas
that are not done yet and :func:`assemble_dataset` writes them into one dataset.

* **Starts** (:data:`START_KINDS`, cycled over the replica index): ``input``, the
  minimised input structure (the folded state when the input is folded); ``unfolded``, the
  end of a ``unfold_ps`` run at ``unfold_temperature`` from it (with the replica's own
  seed, so every unfolded start differs).
* **Seeds**: replica ``i`` of a run with seed ``s`` uses the seeds of
  ``SeedSequence([s, i])`` (:func:`replica_seeds`): independent of the number of replicas,
  so a run can be extended later by asking for more.
* **Workers**: every replica runs in a fresh ``spawn`` process with its own Context; on
  the CPU platform with one thread each (``workers`` processes fill ``workers`` cores),
  else on the platform ``auto`` picks (CUDA when present: every worker its own Context on
  the GPU). With one worker, or one replica left to run, the replicas run in this process
  instead (no process start-up, same frames).
* **Resume**: each finished replica is written atomically as ``replica-NNNNN.npz`` in the
  work folder (``OUT.parts/`` next to the output), with the run's fingerprint. An
  interrupted run (Ctrl-C, SIGTERM, a crash) keeps them, and running the same plan again
  runs only the missing replicas; parts of another plan are refused (their folder named).
  On the Reference platform, and on CPU (always one thread per replica, the minimisation
  too), a replica run again gives the same frames bit for bit (tested); on CUDA/OpenCL this
  was not checked (no GPU here): if not, a resumed replica is another, equally valid sample.
* **CG frames**: with a mapping, workers store only bead positions and mapped forces.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import BadFileError, FlowforceError
from ..io import atomic_write_bytes, atomic_write_npz

__all__ = ["START_KINDS", "ReplicaPlan", "ReplicaSettings", "assemble_dataset", "replica_seeds",
           "run_missing_replicas", "work_folder"]

#: Format tag of the work folder's manifest and of every part file.
PARTS_FORMAT = "openmm-flowforce/md-replica-part/1"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ReplicaSettings:
    """What every replica does (all of it enters the fingerprint).

    Attributes:
        temperature: K.
        time_ns: recorded time per replica, ns.
        save_every_ps: time between frames, ps.
        timestep_fs: fs.
        friction_per_ps: Langevin friction, 1/ps.
        equilibration_ps: unrecorded dynamics at ``temperature`` before recording, ps.
        seed: the run's seed; replica seeds derive from it (:func:`replica_seeds`).
        starts: start kinds (:data:`START_KINDS`), cycled: replica ``i`` gets ``starts[i % len]``.
        unfold_ps: length of the high-temperature run of an ``unfolded`` start, ps.
        unfold_temperature: its temperature, K.
    """

    temperature: float = 300.0
    time_ns: float = 0.1
    save_every_ps: float = 1.0
    timestep_fs: float = 2.0
    friction_per_ps: float = 1.0
    equilibration_ps: float = 10.0
    seed: int = 0
    starts: tuple[str, ...] = ("input",)
    unfold_ps: float = 100.0
    unfold_temperature: float = 600.0


@dataclass
class ReplicaJob:
    """One replica as sent to a worker process (picklable)."""

    index: int
    start: str
    system_xml: str
    input_nm: np.ndarray
    settings: ReplicaSettings
    platform: str
    cpu_threads: int | None
    mapping: dict[str, Any] | None
    part: str
    fingerprint: str


def replica_seeds(seed: int, index: int) -> tuple[int, int]:
    """``(production seed, unfolding seed)`` of replica ``index``: 31-bit, nonzero, and a
    function of ``(seed, index)`` alone."""
    states = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return tuple(int(s) % (2**31 - 2) + 1 for s in states)  # type: ignore[return-value]


def kabsch_rmsd(a: np.ndarray, b: np.ndarray) -> float:
    """RMSD (same unit as the input) of ``(N, 3)`` ``a`` and ``b`` after optimal rigid
    superposition (Kabsch, Acta Cryst. A32, 922 (1976))."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    u, s, vt = np.linalg.svd(a.T @ b)
    s[-1] *= np.sign(np.linalg.det(u @ vt))  # a proper rotation, no reflection
    return float(np.sqrt(max(0.0, ((a**2).sum() + (b**2).sum() - 2.0 * s.sum()) / len(a))))


# -- start structures: name -> function(job, system) -> (positions nm, info) ---------------------
StartFunction = Callable[[ReplicaJob, Any], tuple[np.ndarray, dict[str, Any]]]


@dataclass(frozen=True)
class StartKind:
    """A kind of start structure: a one-line description and how to make it."""

    description: str
    make: StartFunction


def _input_start(job: ReplicaJob, system: Any) -> tuple[np.ndarray, dict[str, Any]]:
    return job.input_nm, {}


def _unfolded_start(job: ReplicaJob, system: Any) -> tuple[np.ndarray, dict[str, Any]]:
    from .reference import run_reference_md

    s = job.settings
    _, unfold_seed = replica_seeds(s.seed, job.index)
    hot = run_reference_md(None, system, job.input_nm, temperature=s.unfold_temperature,
                           time_ns=s.unfold_ps / 1000.0, save_every_ps=s.unfold_ps, timestep_fs=s.timestep_fs,
                           friction_per_ps=s.friction_per_ps, seed=unfold_seed, platform=job.platform,
                           progress=False, equilibration_ps=0.0, minimize=False, cpu_threads=job.cpu_threads)
    if hot["interrupted"]:
        raise KeyboardInterrupt
    if hot["error"] or len(hot["positions"]) != 1:
        raise FlowforceError(f"replica {job.index}: the unfolding run at {s.unfold_temperature:g} K failed "
                             f"({hot['error'] or 'no frame'}); lower --unfold-temperature or the time step")
    return hot["positions"][-1], {"unfold_seed": unfold_seed, "unfold_steps": hot["steps"],
                                  "unfold_wall_time_s": hot["wall_time_s"]}


#: Start kinds, by name.
START_KINDS: dict[str, StartKind] = {
    "input": StartKind("the input structure, energy-minimised", _input_start),
    "unfolded": StartKind("the end of a short run at --unfold-temperature from the input structure", _unfolded_start),
}


def run_replica(job: ReplicaJob) -> dict[str, Any]:
    """Run one replica and write its part file atomically (in a worker process).

    Returns:
        The replica's provenance (also stored in the part as ``info``).

    Raises:
        FlowforceError: the run blew up (non-finite energy) or a start could not be made.
    """
    from ..safety import deserialize_xml
    from .reference import run_reference_md

    started = time.perf_counter()
    s = job.settings
    # trust: the parent serialised its own System, whose inputs were checked when it loaded them
    system = deserialize_xml(job.system_xml, "the replica's System", trust=True, expected="System")
    start_nm, start_info = START_KINDS[job.start].make(job, system)
    seed, _ = replica_seeds(s.seed, job.index)
    result = run_reference_md(None, system, start_nm, temperature=s.temperature, time_ns=s.time_ns,
                              save_every_ps=s.save_every_ps, timestep_fs=s.timestep_fs,
                              friction_per_ps=s.friction_per_ps, seed=seed, platform=job.platform, progress=False,
                              equilibration_ps=s.equilibration_ps, minimize=False, cpu_threads=job.cpu_threads)
    if result["interrupted"]:  # run in the main process: Ctrl-C or SIGTERM; no part for an unfinished replica
        raise KeyboardInterrupt
    if result["error"]:
        raise FlowforceError(f"{job.start} start: {result['error']}")
    positions, forces = result["positions"], result["forces"]
    if job.mapping is not None:
        from ..coordinates.cg_mapping import CGMapping

        mapping = CGMapping.from_dict(job.mapping)
        positions, forces = mapping.map_positions(positions), mapping.map_forces(forces)
    info = {"replica": job.index, "start": job.start, "seed": seed, **start_info,
            "start_rmsd_nm": kabsch_rmsd(np.asarray(start_nm), job.input_nm),
            "platform": result["platform"], "steps": result["steps"] + start_info.get("unfold_steps", 0),
            "frames": int(len(result["energies"])), "simulated_ns": result["simulated_ns"],
            "production_wall_time_s": result["production_wall_time_s"], "ns_per_day": result["ns_per_day"],
            "wall_time_s": time.perf_counter() - started, "fingerprint": job.fingerprint}
    atomic_write_npz(job.part, {"format": np.array(PARTS_FORMAT), "positions": positions.astype(np.float32),
                                "forces": forces.astype(np.float32), "energies": result["energies"],
                                "info": np.array(json.dumps(info))})
    return info


def _worker_main(job: ReplicaJob) -> None:
    """Entry point of a worker process: run one replica; on failure leave the reason next to
    its part file (``.error``) and exit with status 1."""
    import tqdm

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group; the parent decides
    # tqdm's default lock is a multiprocessing semaphore; a worker ended by terminate() would
    # leak it, and the resource tracker would warn about it at exit.
    tqdm.tqdm.set_lock(threading.RLock())
    try:
        run_replica(job)
    except Exception as error:
        message = str(error) if isinstance(error, FlowforceError) else traceback.format_exc()
        atomic_write_bytes(job.part + ".error", message.encode())
        sys.exit(1)


# -- the plan ------------------------------------------------------------------------------------
def work_folder(out: str | os.PathLike) -> Path:
    """The folder of part files of output ``out``: ``OUT.parts`` next to it."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


@dataclass
class ReplicaPlan:
    """A replica run: the System, the start, what to run and where to keep the parts.

    Attributes:
        topology: ``openmm.app.Topology`` of the molecule.
        system: ``openmm.System``.
        positions: ``(N, 3)`` nm, the input structure (minimised before the replicas start).
        n_replicas: how many replicas the dataset holds.
        settings: :class:`ReplicaSettings`.
        out: the dataset file; the parts go to :func:`work_folder` of it.
        mapping: a ``CGMapping`` to store bead frames instead of atoms, or None.
        workers: processes running at once.
        platform: ``auto`` or an OpenMM platform name.
        source: one line for the dataset's ``source``.
    """

    topology: Any
    system: Any
    positions: np.ndarray
    n_replicas: int
    settings: ReplicaSettings
    out: Path
    mapping: Any = None
    workers: int = 1
    platform: str = "auto"
    source: str = ""
    _system_xml: str = field(default="", repr=False)
    _key: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        import openmm

        from .reference import _steps

        s = self.settings
        if self.n_replicas < 1:
            raise FlowforceError(f"--replicas {self.n_replicas}: give at least 1")
        if self.workers < 1:
            raise FlowforceError(f"--workers {self.workers}: give at least 1")
        unknown = [name for name in s.starts if name not in START_KINDS]
        if unknown or not s.starts:
            raise FlowforceError(f"--starts {','.join(s.starts)}: unknown start kind {', '.join(unknown) or '(none)'}; "
                                 f"choose from {', '.join(START_KINDS)}, comma-separated")
        if "unfolded" in s.starts:
            if not (math.isfinite(s.unfold_temperature) and s.unfold_temperature > 0):
                raise FlowforceError(f"--unfold-temperature {s.unfold_temperature:g}: give a positive number of K")
            _steps("--unfold-ps", s.unfold_ps * 1000.0, s.timestep_fs)
        self.out = Path(self.out)
        self.positions = np.asarray(self.positions, dtype=np.float64)
        self._system_xml = openmm.XmlSerializer.serialize(self.system)

    @property
    def folder(self) -> Path:
        return work_folder(self.out)

    def part(self, index: int) -> Path:
        return self.folder / f"replica-{index:05d}.npz"

    def start_of(self, index: int) -> str:
        return self.settings.starts[index % len(self.settings.starts)]

    def fingerprint(self) -> dict[str, Any]:
        """What the parts depend on: System, input positions, settings, mapping (not the number of
        replicas, the workers or the platform: more replicas extend a run, and the same replica
        on another platform is another sample of the same ensemble)."""
        from ..engine import data_hash, fingerprint

        options = {**asdict(self.settings), "starts": list(self.settings.starts),
                   "cg_mapping": None if self.mapping is None else self.mapping.to_dict().get("source")}
        mapping = None if self.mapping is None else _bytes(json.dumps(self.mapping.to_dict(), sort_keys=True))
        return fingerprint(data_hash(_bytes(self._system_xml), self.positions, mapping), options)

    def key(self) -> str:
        """:meth:`fingerprint` as one string (stored in every part)."""
        if not self._key:
            self._key = json.dumps(self.fingerprint(), sort_keys=True)
        return self._key

    def prepare_folder(self) -> None:
        """Create the work folder with its manifest, or check that an existing one holds parts of
        this plan.

        Raises:
            FlowforceError: the folder holds parts of another run (names what differs).
        """
        from ..engine import fingerprint_differences

        manifest = self.folder / MANIFEST
        current = self.fingerprint()
        if manifest.is_file():
            try:
                saved = json.loads(manifest.read_text())
            except (OSError, ValueError) as error:
                raise BadFileError(f"{manifest} is not readable ({error}); delete {self.folder} to start "
                                   "over") from None
            if saved.get("format") != PARTS_FORMAT or saved.get("fingerprint") != current:
                what = "; ".join(fingerprint_differences(saved.get("fingerprint", {}), current)) or "another format"
                raise FlowforceError(f"{self.folder} holds replicas of another run ({what}); run the same command as "
                                     f"before to continue it, or delete {self.folder} to start over")
        elif self.folder.exists() and any(self.folder.iterdir()):
            raise FlowforceError(f"{self.folder} exists without {MANIFEST}; it is not a flowforce work folder: move "
                                 "it away or choose another --out")
        else:
            atomic_write_bytes(manifest, json.dumps({"format": PARTS_FORMAT, "fingerprint": current}).encode())

    def read_part(self, index: int) -> dict[str, Any] | None:
        """The arrays and info of a finished replica, or None when its part is missing or not
        one of this plan (then it is run again)."""
        path = self.part(index)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
            info = json.loads(str(arrays["info"]))
            ok = (str(arrays["format"]) == PARTS_FORMAT and info.get("replica") == index
                  and info.get("fingerprint") == self.key())
        except Exception:  # truncated or foreign file: numpy/zipfile/json raise many types
            ok = False
        if not ok:
            print(f"flowforce md: warning: {path} is not a finished replica of this run; running it again",
                  file=sys.stderr)
            return None
        return {**arrays, "info": info}

    def missing(self) -> list[int]:
        return [i for i in range(self.n_replicas) if self.read_part(i) is None]


def _bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8)


#: CPU platform threads of every replica. Always one, also for a single worker: the CPU
#: platform's sums depend on the thread count, so a replica resumed with another --workers
#: would otherwise not repeat its frames; parallelism comes from the workers.
REPLICA_CPU_THREADS = 1


def run_missing_replicas(plan: ReplicaPlan, progress: bool = True) -> dict[str, Any]:
    """Run every replica of ``plan`` whose part file is missing, ``plan.workers`` at a time.

    The input structure is minimised once here; the workers start from it. Ctrl-C or SIGTERM
    (raised as ``KeyboardInterrupt``) ends the running workers at once; finished replicas
    stay in the work folder.

    Returns:
        ``{"ran": [...], "failed": {index: message}, "already_done": [...], "wall_time_s": s}``.

    Raises:
        FlowforceError: the work folder belongs to another run.
        KeyboardInterrupt: on Ctrl-C or SIGTERM, after the workers have ended.
    """
    from tqdm.auto import tqdm

    from .reference import minimize_energy

    plan.prepare_folder()
    todo = plan.missing()
    done = [i for i in range(plan.n_replicas) if i not in todo]
    report: dict[str, Any] = {"ran": [], "failed": {}, "already_done": done, "wall_time_s": 0.0}
    if not todo:
        return report
    started = time.perf_counter()
    # One thread here too: with several, the CPU platform's sums (and so the minimum) can vary
    # from run to run, and a resumed replica would not repeat its frames.
    relaxed, _, _ = minimize_energy(plan.system, plan.positions, plan.platform, REPLICA_CPU_THREADS)
    mapping = None if plan.mapping is None else plan.mapping.to_dict()

    def job(index: int) -> ReplicaJob:
        return ReplicaJob(index, plan.start_of(index), plan._system_xml, relaxed, plan.settings, plan.platform,
                          REPLICA_CPU_THREADS, mapping, str(plan.part(index)), plan.key())

    signalled: list[str] = []
    previous_term = _raise_on_sigterm(signalled)
    try:
        with tqdm(total=plan.n_replicas, initial=len(done), desc="replicas", unit="replica",
                  disable=not progress) as bar:
            if plan.workers == 1 or len(todo) == 1:
                _run_here([job(i) for i in todo], report, bar, signalled)
            else:
                _run_in_workers([job(i) for i in todo], plan, report, bar)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous_term)
        report["wall_time_s"] = time.perf_counter() - started
    return report


def _run_here(jobs: list[ReplicaJob], report: dict[str, Any], bar: Any, signalled: list[str]) -> None:
    """One worker: the replicas one after the other in this process (no start-up cost)."""
    for job in jobs:
        try:
            run_replica(job)
        except FlowforceError as error:
            report["failed"][job.index] = str(error)
            continue
        except KeyboardInterrupt:
            raise KeyboardInterrupt(*signalled[-1:]) from None
        report["ran"].append(job.index)
        bar.update(1)


def _run_in_workers(jobs: list[ReplicaJob], plan: ReplicaPlan, report: dict[str, Any], bar: Any) -> None:
    """``plan.workers`` spawned processes at a time, one per replica; on any exit from here
    (Ctrl-C, SIGTERM, a bug) the running ones are ended."""
    context = multiprocessing.get_context("spawn")
    pending = list(jobs)
    running: dict[Any, tuple[Any, int]] = {}
    try:
        while pending or running:
            while pending and len(running) < plan.workers:
                job = pending.pop(0)
                index = job.index
                Path(job.part + ".error").unlink(missing_ok=True)
                process = context.Process(target=_worker_main, args=(job,), daemon=True)
                _start_ignoring_sigint(process)
                running[process.sentinel] = (process, index)
            for sentinel in multiprocessing.connection.wait(list(running), timeout=1.0):
                process, index = running.pop(sentinel)
                process.join()
                if plan.read_part(index) is not None:
                    report["ran"].append(index)
                    bar.update(1)
                else:
                    error_file = Path(str(plan.part(index)) + ".error")
                    message = (error_file.read_text().strip().splitlines() or ["?"])[-1] if error_file.is_file() \
                        else f"the worker process ended with status {process.exitcode} and wrote nothing"
                    report["failed"][index] = message
    finally:
        for process, _ in running.values():
            process.terminate()
        for process, _ in running.values():
            process.join(10.0)
            if process.is_alive():
                process.kill()
                process.join()


def _start_ignoring_sigint(process: Any) -> None:
    """Start ``process`` with SIGINT ignored from its first instruction (an ignored signal stays
    ignored across exec), so a Ctrl-C during its start-up prints no traceback."""
    if sys.platform == "win32" or threading.current_thread() is not threading.main_thread():
        process.start()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process.start()
    finally:
        signal.signal(signal.SIGINT, previous)


def _raise_on_sigterm(signalled: list[str]) -> Any:
    """Make SIGTERM raise ``KeyboardInterrupt("SIGTERM")`` (the package's one interrupt path),
    noting it in ``signalled`` (MD in this process catches the interrupt and stops cleanly)."""
    def handler(number: int, frame: Any) -> None:
        signalled.append("SIGTERM")
        raise KeyboardInterrupt("SIGTERM")

    if threading.current_thread() is not threading.main_thread():
        return signal.getsignal(signal.SIGTERM)  # only the main thread may set handlers; leave SIGTERM as it is
    return signal.signal(signal.SIGTERM, handler)


def _speeds(infos: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """ns/day per platform: per replica (simulated / production wall time of each worker)."""
    out: dict[str, dict[str, float]] = {}
    for name in sorted({info["platform"] for info in infos}):
        mine = [info for info in infos if info["platform"] == name]
        ns = sum(info["simulated_ns"] for info in mine)
        seconds = sum(info["production_wall_time_s"] for info in mine)
        out[name] = {"ns_per_day_per_replica": ns / seconds * 86400.0 if seconds > 0 else 0.0,
                     "replicas": len(mine), "simulated_ns": ns}
    return out


def assemble_dataset(plan: ReplicaPlan, session: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write every replica of ``plan`` into one dataset at ``plan.out`` (atomically).

    Frames are ordered by replica, then time; ``replica`` names each frame's replica and
    ``provenance`` holds every replica's start kind, seed, platform, steps, wall time and
    ns/day, the ns/day per platform, and the settings.

    Args:
        plan: a plan whose replicas are all finished.
        session: :func:`run_missing_replicas`'s report, for the run's overall throughput.

    Returns:
        The provenance written.

    Raises:
        FlowforceError: a replica is missing.
    """
    from ..data.dataset import save_dataset

    parts = [plan.read_part(i) for i in range(plan.n_replicas)]
    missing = [i for i, part in enumerate(parts) if part is None]
    if missing:
        raise FlowforceError(f"replicas {missing} are not finished; run the same command again")
    infos = [part["info"] for part in parts]  # type: ignore[index]
    provenance: dict[str, Any] = {
        "replicas": [{k: v for k, v in info.items() if k != "fingerprint"} for info in infos],
        "ns_per_day": _speeds(infos),
        "settings": {**asdict(plan.settings), "starts": list(plan.settings.starts)},
        "workers": plan.workers,
    }
    if session and session.get("ran") and session.get("wall_time_s", 0) > 0:
        ran_ns = sum(infos[i]["simulated_ns"] for i in session["ran"])
        provenance["session"] = {"replicas_run": len(session["ran"]), "wall_time_s": session["wall_time_s"],
                                 "ns_per_day_all_workers": ran_ns / session["wall_time_s"] * 86400.0}
    save_dataset(plan.out, topology=None if plan.mapping is not None else plan.topology,
                 positions=np.concatenate([part["positions"] for part in parts]),  # type: ignore[index]
                 forces=np.concatenate([part["forces"] for part in parts]),  # type: ignore[index]
                 energies=np.concatenate([part["energies"] for part in parts]),  # type: ignore[index]
                 temperature=plan.settings.temperature, timestep_fs=plan.settings.timestep_fs,
                 save_every_ps=plan.settings.save_every_ps, source=plan.source,
                 system=None if plan.mapping is not None else plan.system,
                 replica=np.concatenate([np.full(info["frames"], i) for i, info in enumerate(infos)]),
                 provenance=provenance, cg_mapping=plan.mapping)
    return provenance


def remove_work_folder(plan: ReplicaPlan) -> None:
    """Delete the part files and the work folder (after the dataset was written)."""
    for path in plan.folder.glob("replica-*.npz*"):
        path.unlink(missing_ok=True)
    (plan.folder / MANIFEST).unlink(missing_ok=True)
    try:
        plan.folder.rmdir()
    except OSError:  # something else was put there; leave it
        pass
