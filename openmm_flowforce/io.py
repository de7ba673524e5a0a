"""Files that matter are written atomically; checkpoints load with ``weights_only=True``.

torch is imported inside the checkpoint functions so that reading data files does not
pay for it."""
from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

#: Format tag of every checkpoint the trainer writes (model files are trainer checkpoints).
CHECKPOINT_FORMAT = "openmm-flowforce/checkpoint/1"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename,
    so a reader never sees a half-written file and an interrupted write leaves the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_npz(path: str | os.PathLike, arrays: dict[str, Any]) -> None:
    """``numpy.savez`` to bytes, then :func:`atomic_write_bytes` (no partial files)."""
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` to bytes, then :func:`atomic_write_bytes`."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike, expected_format: str | None = None) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no code runs from the file).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is corrupt, truncated, or not a checkpoint of the expected
            format; the message names the file and what to do.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/garbled files
        raise ValueError(f"checkpoint {path} is corrupt or not a PyTorch checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]}); re-create it (re-run the command that wrote it)") from None
    if not isinstance(obj, dict) or (expected_format and obj.get("format") != expected_format):
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path} is not a {expected_format or 'flowforce'} checkpoint (found format {found!r})")
    return obj


def _flush_c_stdio() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def silenced_native_stdout():
    """Send what C code writes to file descriptor 1 to /dev/null while the block runs.

    mdtraj's DCD reader (the VMD molfile plugin) prints ``dcdplugin) detected standard
    32-bit DCD file ...`` straight to the process's stdout, which would mix with a CLI
    command's own output. Python-level ``sys.stdout`` is flushed first and is not touched.
    Where fd 1 cannot be duplicated (an embedding without a real stdout), nothing is done.
    """
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
            try:
                yield
            finally:
                _flush_c_stdio()  # C's stdout buffer would otherwise empty after the restore
                os.dup2(saved, 1)
    finally:
        os.close(saved)
