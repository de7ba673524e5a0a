"""The OpenMM energy target: reduced potential energy u(x) = E(x)/kT of a ``openmm.System``.

:class:`OpenMMEnergy` is a differentiable callable ``u = energy(x)`` for positions
``x`` of shape ``(B, N, 3)`` in nm. Energies and forces come from real OpenMM
``Context`` objects on the CPU; the gradient is OpenMM's force, ``du/dx = −F/kT``
(never finite differences), so a loss such as ``reverse_kl_on_samples`` trains a flow
through it.

Evaluation is either serial (one ``Context`` in this process) or spread over worker
processes (``n_workers > 0``), each holding its own ``Context`` built once from the
System's XML. Workers are started with the ``spawn`` method, so a script that creates a
pool at import time needs the usual ``if __name__ == "__main__":`` guard.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import traceback
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

from ..conventions import kT as thermal_energy
from ..errors import FlowforceError

if TYPE_CHECKING:
    import openmm

Tensor = torch.Tensor

_INSTALL_HINT = "OpenMMEnergy needs OpenMM: pip install openmm (or conda install -c conda-forge openmm)"
#: Seconds an idle worker waits between checks that its parent is still alive.
_PARENT_CHECK_S = 1.0
#: Seconds a worker gets to start (spawn imports torch and openmm) and build its Context.
_START_TIMEOUT_S = 120.0
#: Seconds ``close()`` waits for a worker to leave on its own before terminating it.
_JOIN_TIMEOUT_S = 5.0


def _import_openmm():
    try:
        import openmm
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    return openmm


def _platform_names(openmm) -> list[str]:
    return [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]


def _check_platform(platform: str, properties: Mapping[str, str]) -> None:
    """Reject an unknown platform or property name here, with the valid names."""
    openmm = _import_openmm()
    names = _platform_names(openmm)
    if platform not in names:
        raise FlowforceError(f"unknown OpenMM platform {platform!r}; available: {', '.join(names)}")
    valid = list(openmm.Platform.getPlatformByName(platform).getPropertyNames())
    for key in properties:
        if key not in valid:
            raise FlowforceError(f"unknown property {key!r} for OpenMM platform {platform!r}; "
                                 f"valid: {', '.join(valid) or '(none)'}")


class _ContextEvaluator:
    """One OpenMM Context that evaluates frames one after the other (float64, OpenMM units)."""

    def __init__(self, system: "openmm.System", platform: str, properties: Mapping[str, str]):
        openmm = _import_openmm()
        from openmm import unit

        self._energy_unit = unit.kilojoule_per_mole
        self._force_unit = unit.kilojoule_per_mole / unit.nanometer
        # The integrator is never stepped; a Context just needs one.
        self._integrator = openmm.VerletIntegrator(1e-3)
        self._context = openmm.Context(system, self._integrator,
                                       openmm.Platform.getPlatformByName(platform), dict(properties))
        self._has_virtual_sites = any(system.isVirtualSite(i) for i in range(system.getNumParticles()))

    def evaluate(self, positions: np.ndarray, boxes: np.ndarray | None,
                 want_forces: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Energies (b,) kJ/mol and forces (b, N, 3) kJ/mol/nm (None unless asked for)."""
        b, n = positions.shape[:2]
        energies = np.empty(b)
        forces = np.empty((b, n, 3)) if want_forces else None
        for i in range(b):
            if boxes is not None:
                self._context.setPeriodicBoxVectors(*boxes[i])
            self._context.setPositions(positions[i])
            if self._has_virtual_sites:
                # u is then a function of the real atoms only; OpenMM reports the virtual
                # sites' forces on their parent atoms.
                self._context.computeVirtualSites()
            state = self._context.getState(getEnergy=True, getForces=want_forces)
            energies[i] = state.getPotentialEnergy().value_in_unit(self._energy_unit)
            if forces is not None:
                forces[i] = state.getForces(asNumpy=True).value_in_unit(self._force_unit)
        return energies, forces


def _worker_main(conn, system_xml: str, platform: str, properties: dict, parent_pid: int) -> None:
    """Worker process entry point: serve requests, then leave without interpreter teardown.

    ``os._exit`` is what fork-started children do anyway; here it saves the ~0.5 s that
    tearing down torch and openmm takes, on every ``close()``.
    """
    code = _serve(conn, system_xml, platform, properties, parent_pid)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(code)


def _serve(conn, system_xml: str, platform: str, properties: dict, parent_pid: int) -> int:
    """Build a Context once, then answer ``(positions, boxes, want_forces)`` requests.

    Replies are ``("ok", (energies, forces))`` or ``("error", traceback text)``. Returns
    (the exit code) on ``None``, on EOF of the pipe (the parent closed it or died) or
    when the parent process is gone.
    """
    # Ctrl-C reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from ..safety import deserialize_xml

        _import_openmm()  # its error message names the missing package
        # Trusted: the parent serialised this XML from a System object it already holds,
        # so nothing in it can be new code (files are checked where they are read).
        system = deserialize_xml(system_xml, "the System sent to an OpenMM worker", trust=True)
        evaluator = _ContextEvaluator(system, platform, properties)
        conn.send(("ready", None))
    except Exception:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        return 1
    while True:
        try:
            if not conn.poll(_PARENT_CHECK_S):
                if os.getppid() != parent_pid:
                    return 0
                continue
            request = conn.recv()
        except (EOFError, OSError):
            return 0
        if request is None:
            return 0
        try:
            reply = ("ok", evaluator.evaluate(*request))
        except Exception:
            reply = ("error", traceback.format_exc())
        try:
            conn.send(reply)
        except OSError:
            return 0


def _shutdown_workers(processes: list, connections: list) -> None:
    """Ask every worker to leave, terminate the ones that do not, release the pipes.

    Module-level (no reference to the pool) so ``weakref.finalize`` can call it.
    """
    for conn in connections:
        try:
            conn.send(None)
        except OSError:
            pass
    for process in processes:
        process.join(_JOIN_TIMEOUT_S)
        if process.is_alive():
            process.terminate()
            process.join(_JOIN_TIMEOUT_S)
        if process.is_alive():
            process.kill()
            process.join()
    for conn in connections:
        conn.close()
    processes.clear()
    connections.clear()


class _WorkerPool:
    """Daemonic ``spawn`` workers, each with its own Context; always shut down.

    ``close()``, garbage collection of the pool and interpreter exit all end the workers
    (``weakref.finalize``); a worker whose parent dies sees EOF on its pipe and leaves.
    """

    def __init__(self, system_xml: str, platform: str, properties: Mapping[str, str], n_workers: int):
        context = multiprocessing.get_context("spawn")
        self._processes: list = []
        self._connections: list = []
        self._finalizer = weakref.finalize(self, _shutdown_workers, self._processes, self._connections)
        try:
            for i in range(n_workers):
                parent_end, child_end = context.Pipe(duplex=True)
                process = context.Process(
                    target=_worker_main, name=f"flowforce-openmm-{i}", daemon=True,
                    args=(child_end, system_xml, platform, dict(properties), os.getpid()))
                process.start()
                # Only the child may hold this end, or the child would never see EOF.
                child_end.close()
                self._processes.append(process)
                self._connections.append(parent_end)
            for process, conn in zip(self._processes, self._connections):
                try:
                    status, payload = self._receive(process, conn, timeout=_START_TIMEOUT_S)
                except RuntimeError as error:
                    raise RuntimeError(
                        f"{error} while starting. Workers are spawned: they import the main script, so a "
                        "script that creates OpenMMEnergy(n_workers>0) at top level needs an "
                        "'if __name__ == \"__main__\":' guard") from None
                if status != "ready":
                    raise RuntimeError(f"OpenMM worker {process.name} could not build its Context:\n{payload}")
        except BaseException:
            self.close()
            raise

    @property
    def n_workers(self) -> int:
        return len(self._processes)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        self._finalizer()

    @staticmethod
    def _receive(process, conn, timeout: float | None = None):
        if timeout is not None and not conn.poll(timeout):
            raise RuntimeError(f"OpenMM worker {process.name} did not answer within {timeout:.0f} s")
        try:
            return conn.recv()
        except (EOFError, OSError):
            process.join(_JOIN_TIMEOUT_S)
            raise RuntimeError(f"OpenMM worker {process.name} died (exit code {process.exitcode})") from None

    def evaluate(self, positions: np.ndarray, boxes: np.ndarray | None,
                 want_forces: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Split the batch into contiguous chunks, one per worker, and gather in order."""
        if self.closed:
            raise RuntimeError("the OpenMMEnergy worker pool is closed")
        chunks = [c for c in np.array_split(np.arange(positions.shape[0]), self.n_workers) if len(c)]
        workers = list(zip(self._processes, self._connections))[:len(chunks)]
        try:
            for (_, conn), chunk in zip(workers, chunks):
                conn.send((positions[chunk], None if boxes is None else boxes[chunk], want_forces))
            # Collect every reply before raising, so the pipes stay in step.
            replies = [self._receive(process, conn) for process, conn in workers]
        except BaseException:
            # Interrupted or a worker died: the request/reply protocol is out of step.
            self.close()
            raise
        errors = [payload for status, payload in replies if status != "ok"]
        if errors:
            raise RuntimeError(f"OpenMM evaluation failed in a worker:\n{errors[0]}")
        energies = np.concatenate([payload[0] for _, payload in replies])
        forces = np.concatenate([payload[1] for _, payload in replies]) if want_forces else None
        return energies, forces


class _NoSecondDerivative(torch.autograd.Function):
    """Identity whose backward raises: marks OpenMM's forces as constant in x."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        return t.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        raise RuntimeError("OpenMMEnergy has first derivatives only: its forces cannot be "
                           "differentiated again (double backward through create_graph=True)")


class _OpenMMEnergyFunction(torch.autograd.Function):
    """u = E/kT with du/dx = −F/kT from OpenMM. First derivatives only."""

    @staticmethod
    def forward(ctx, x: Tensor, target: "OpenMMEnergy", box_vectors: Any, want_forces: bool) -> Tensor:
        positions = x.detach().to(device="cpu", dtype=torch.float64).numpy()
        energies, forces = target._evaluate(positions, box_vectors, want_forces)
        bad = target.last_nonfinite_frames
        if len(bad):
            warnings.warn(f"{len(bad)} of {len(energies)} frames have a non-finite energy or forces "
                          f"(first: frame {int(bad[0])}); their gradients are set to zero "
                          "(see OpenMMEnergy.last_nonfinite)", RuntimeWarning, stacklevel=3)
        if want_forces:
            # Zero whole frames, not single entries: a partly non-finite force is no
            # gradient of anything, and 0·NaN would poison masked losses (torch.where).
            forces[bad] = 0.0
            ctx.save_for_backward(torch.from_numpy(forces / -target.kT).to(device=x.device, dtype=x.dtype))
        return torch.from_numpy(energies / target.kT).to(device=x.device, dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad_u: Tensor):
        (du_dx,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: du/dx would silently look constant in x (and in whatever
            # produced x); make any use of its derivative fail loudly instead.
            du_dx = _NoSecondDerivative.apply(du_dx.detach().requires_grad_(True))
        return grad_u[:, None, None] * du_dx, None, None, None


class OpenMMEnergy:
    """Reduced potential energy u(x) = E(x)/kT of an OpenMM System, differentiable in x.

    ``u = energy(x)`` takes positions ``x`` of shape ``(B, N, 3)`` in nm (any floating
    dtype, any device) and returns ``u`` of shape ``(B,)`` on ``x``'s device and dtype.
    OpenMM computes on the CPU in float64; the backward pass uses OpenMM's forces,
    ``du/dx = −F/kT``. Differentiating those forces again (double backward after
    ``create_graph=True``) raises a RuntimeError rather than silently treating them as
    constant.

    Frames whose energy or forces come out non-finite (overlapping atoms) keep their
    energy as OpenMM gives it (``inf`` or ``nan``), but their gradient is set to zero,
    so masking them out of a loss leaves the other frames' gradients intact; their
    number is ``last_nonfinite`` and their indices ``last_nonfinite_frames`` (also for
    :meth:`energies_and_forces`, which returns the raw values), and a ``RuntimeWarning``
    is issued in the torch path. In Systems with virtual sites, their positions are
    recomputed from the parent atoms, so u depends on the real atoms only.

    With ``n_workers > 0`` frames are evaluated by that many worker processes (``spawn``
    start method), each with its own Context built from the System's XML; use
    :meth:`close` or ``with OpenMMEnergy(...) as energy:`` to stop them (they also stop
    when the object is garbage collected, at interpreter exit, or if this process dies).
    On a deterministic platform (Reference) serial and parallel results are identical;
    on "CPU" pass ``platform_properties={"Threads": "1"}`` with workers, or the workers
    compete for the cores.

    Args:
        system: the OpenMM System; its particle count N is checked against ``x``.
        temperature: temperature in K, defining kT.
        platform: OpenMM platform name ("Reference", "CPU", ...).
        n_workers: worker processes; 0 evaluates in this process.
        platform_properties: OpenMM platform properties (names are checked).

    Raises:
        ValueError: for a bad temperature, platform, property, or ``n_workers``, or a
            System that cannot be serialized when ``n_workers > 0``.
    """

    def __init__(self, system: "openmm.System", temperature: float, platform: str = "Reference",
                 n_workers: int = 0, platform_properties: Mapping[str, str] | None = None):
        openmm = _import_openmm()
        if not isinstance(system, openmm.System):
            raise TypeError(f"system must be an openmm.System, got {type(system).__name__}")
        if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 0:
            raise FlowforceError(f"n_workers must be an integer >= 0, got {n_workers!r}")
        properties = {str(k): str(v) for k, v in (platform_properties or {}).items()}
        _check_platform(platform, properties)
        self.temperature = float(temperature)
        #: k_B·T in kJ/mol.
        self.kT = thermal_energy(temperature)
        self.platform = platform
        self.n_particles = system.getNumParticles()
        if self.n_particles == 0:
            raise FlowforceError("the System has no particles")
        self.uses_periodic_box = system.usesPeriodicBoundaryConditions()
        from openmm import unit
        self.default_box_vectors = np.array(
            [v.value_in_unit(unit.nanometer) for v in system.getDefaultPeriodicBoxVectors()], dtype=np.float64)
        #: Frames of the last evaluation with a non-finite energy or force, and their count.
        self.last_nonfinite_frames = np.zeros(0, dtype=np.int64)
        self.last_nonfinite = 0
        self._serial: _ContextEvaluator | None = None
        self._pool: _WorkerPool | None = None
        self._closed = False
        if n_workers == 0:
            self._serial = _ContextEvaluator(system, platform, properties)
        else:
            try:
                system_xml = openmm.XmlSerializer.serialize(system)
            except Exception as error:
                raise FlowforceError("n_workers > 0 sends the System to the workers as XML, but it cannot be "
                                     f"serialized ({error}); use n_workers=0") from error
            self._pool = _WorkerPool(system_xml, platform, properties, n_workers)

    @property
    def n_workers(self) -> int:
        return 0 if self._pool is None else self._pool.n_workers

    def __repr__(self) -> str:
        state = ", closed" if self._closed else ""
        return (f"OpenMMEnergy(n_particles={self.n_particles}, temperature={self.temperature}, "
                f"platform={self.platform!r}, n_workers={self.n_workers}{state})")

    # -- evaluation ------------------------------------------------------------------

    def __call__(self, x: Tensor, box_vectors: Any = None) -> Tensor:
        """Reduced energies u = E/kT, shape ``(B,)``, for positions ``x`` ``(B, N, 3)`` nm.

        Args:
            x: positions in nm; gradients flow back through OpenMM's forces.
            box_vectors: periodic box in nm, ``(3, 3)`` for all frames or ``(B, 3, 3)``
                (rows a, b, c in OpenMM's reduced form); only for periodic Systems. The
                System's default box is used when omitted.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}; "
                            "use energies_and_forces() for numpy arrays")
        if not x.is_floating_point():
            raise TypeError(f"x must have a floating dtype, got {x.dtype}")
        self._check_shape(tuple(x.shape))
        # Forces only when a gradient can be asked for (needs_input_grad ignores no_grad).
        want_forces = torch.is_grad_enabled() and x.requires_grad
        return _OpenMMEnergyFunction.apply(x, self, box_vectors, want_forces)

    def energies_and_forces(self, x: Any, box_vectors: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Energies ``(B,)`` in kJ/mol and forces ``(B, N, 3)`` in kJ/mol/nm as float64 numpy.

        Values are returned as OpenMM gives them, non-finite ones included (counted in
        ``last_nonfinite``). ``x`` is array-like ``(B, N, 3)`` in nm.
        """
        positions = np.asarray(x, dtype=np.float64)
        self._check_shape(positions.shape)
        energies, forces = self._evaluate(positions, box_vectors, want_forces=True)
        return energies, forces

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 3 or shape[2] != 3:
            raise FlowforceError(f"positions must have shape (B, N, 3), got {shape}")
        if shape[1] != self.n_particles:
            raise FlowforceError(f"positions have {shape[1]} particles but the System has {self.n_particles}")

    def _boxes(self, box_vectors: Any, n_frames: int) -> np.ndarray | None:
        """Per-frame boxes (B, 3, 3) nm, or None for a non-periodic System."""
        if box_vectors is None:
            if not self.uses_periodic_box:
                return None
            # Always set a box: the Context keeps whatever an earlier call set.
            return np.broadcast_to(self.default_box_vectors, (n_frames, 3, 3))
        if not self.uses_periodic_box:
            raise FlowforceError("box_vectors given, but the System does not use periodic boundary conditions")
        if isinstance(box_vectors, torch.Tensor):
            box_vectors = box_vectors.detach().cpu()
        boxes = np.asarray(box_vectors, dtype=np.float64)
        if boxes.shape == (3, 3):
            boxes = np.broadcast_to(boxes, (n_frames, 3, 3))
        elif boxes.shape != (n_frames, 3, 3):
            raise FlowforceError(f"box_vectors must have shape (3, 3) or ({n_frames}, 3, 3), got {boxes.shape}")
        if not np.isfinite(boxes).all():
            raise FlowforceError("box_vectors are not finite")
        return boxes

    def _evaluate(self, positions: np.ndarray, box_vectors: Any,
                  want_forces: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Check frames, evaluate serially or in the pool, record non-finite frames."""
        if self._closed:
            raise RuntimeError("this OpenMMEnergy is closed")
        finite = np.isfinite(positions).all(axis=(1, 2))
        if not finite.all():
            bad = np.flatnonzero(~finite)
            listed = ", ".join(str(i) for i in bad[:10]) + (", ..." if len(bad) > 10 else "")
            raise FlowforceError(f"positions of frame {bad[0]} are not finite (NaN or inf); "
                                 f"{len(bad)} such frame(s): {listed}")
        boxes = self._boxes(box_vectors, positions.shape[0])
        if positions.shape[0] == 0:
            energies, forces = np.zeros(0), (np.zeros((0, self.n_particles, 3)) if want_forces else None)
        elif self._pool is not None:
            energies, forces = self._pool.evaluate(positions, boxes, want_forces)
        else:
            energies, forces = self._serial.evaluate(positions, boxes, want_forces)
        nonfinite = ~np.isfinite(energies)
        if forces is not None:
            nonfinite |= ~np.isfinite(forces).all(axis=(1, 2))
        self.last_nonfinite_frames = np.flatnonzero(nonfinite)
        self.last_nonfinite = len(self.last_nonfinite_frames)
        return energies, forces

    # -- lifetime --------------------------------------------------------------------

    def close(self) -> None:
        """Stop the worker processes and release the Context. Safe to call twice."""
        self._closed = True
        if self._pool is not None:
            self._pool.close()
        self._serial = None

    def __enter__(self) -> "OpenMMEnergy":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
