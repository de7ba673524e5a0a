"""Files in and out: atomic writes, output checks before the work, checkpoints loaded with
``weights_only=True``, and one message for an input that cannot be read.

* :func:`atomic_write_bytes` writes through a temporary file and a rename; temporaries
  of killed runs are removed on the next write; a failed write keeps the data in a
  rescue file and says where.
* :func:`check_outputs` refuses, before a command starts, outputs that are inputs, folders,
  special files, read-only, or under a file or an unwritable folder.
* :func:`require_input_file` / :func:`bad_file` give every loader the same messages for
  missing, empty, unreadable and corrupt files.

torch is imported inside the checkpoint functions so that reading data files does not
pay for it."""
from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import secrets
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from .errors import BadFileError, MissingFileError, OutputError, UnsafeFileError, WriteFailedError

#: Format tag of every checkpoint the trainer writes (model files are trainer checkpoints).
CHECKPOINT_FORMAT = "openmm-flowforce/checkpoint/1"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname().split(".")[0]) or "host"


def _temporary_path(path: Path) -> Path:
    """``.NAME.ff-PID-HOST-RANDOM.tmp`` next to ``path``: the pid and host tell a later run
    whether the writer is gone."""
    return path.with_name(f".{path.name}.ff-{os.getpid()}-{_host()}-{secrets.token_hex(4)}.tmp")


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete temporary files of earlier atomic writes of ``path`` whose process is gone
    (killed mid-write); returns what was removed.

    A temporary of a live process on this host, or of another host, is left alone. Those of
    older versions (``.NAME.XXXXXXXX.tmp``, no pid) are removed when over an hour old.
    """
    path = Path(path)
    removed = []
    try:
        siblings = list(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))
    except OSError:
        return removed
    ours = re.compile(rf"\.{re.escape(path.name)}\.ff-(\d+)-([A-Za-z0-9]+)-[0-9a-f]{{8}}\.tmp")
    legacy = re.compile(rf"\.{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}\.tmp")
    for sibling in siblings:
        match = ours.fullmatch(sibling.name)
        try:
            if match:
                stale = match.group(2) == _host() and not _alive(int(match.group(1)))
            else:
                stale = legacy.fullmatch(sibling.name) is not None and time.time() - sibling.stat().st_mtime > 3600
            if stale and sibling.is_file():
                sibling.unlink()
                removed.append(sibling)
        except OSError:
            pass
    return removed


def _rescue(path: Path, data: bytes) -> Path | None:
    """Save ``data`` somewhere else after writing ``path`` failed; the place, or None."""
    rescue = Path(tempfile.gettempdir()) / f"flowforce-rescued-{os.getpid()}-{path.name}"
    if rescue.parent.resolve() == path.parent.resolve():
        return None
    try:
        with open(rescue, "wb") as handle:
            handle.write(data)
        return rescue
    except OSError:
        with contextlib.suppress(OSError):
            rescue.unlink()
        return None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename,
    so a reader never sees a half-written file and an interrupted write leaves the old one.

    Temporaries that killed runs left next to ``path`` are removed first
    (:func:`remove_stale_temporaries`).

    Raises:
        WriteFailedError: the write failed (disk full, folder gone, ...). Nothing partial is
            left at ``path``; the data were saved to a file in the system's temporary folder
            when possible, and the message says where.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        tmp = _temporary_path(path)
        # 0o666 minus the umask: the mode an ordinary open() would give.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path
    except OSError as error:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        rescue = _rescue(path, data)
        where = (f"the result was saved to {rescue} instead; move it to {path} once the problem is fixed"
                 if rescue else "the result could not be saved anywhere")
        raise WriteFailedError(f"could not write {path} ({error.strerror or error}); {where}") from error
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
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


#: What to do with an output file that a run would resume from but cannot read.
RESUME_FIX = "start over with --restart (the old file is kept as NAME.prev), or give another output file"

#: Format tags of the package's files, as users know them (for "wrong kind of file" messages).
KNOWN_FORMATS: dict[str, str] = {
    CHECKPOINT_FORMAT: "a model checkpoint (flowforce train / flowforce cg)",
    "openmm-flowforce/sampler-checkpoint/1": "a sampler checkpoint (flowforce sampler train)",
    "openmm-flowforce/dataset/1": "a dataset (flowforce md)",
    "openmm-flowforce/torchscript/1": "an exported model (flowforce export)",
}


def _first_line(error: BaseException) -> str:
    """``Type: first line of the message`` (the type alone when the message is empty)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def require_input_file(path: str | os.PathLike, what: str, fix: str = "") -> Path:
    """``path`` as a ``Path`` after checking that it is an existing, readable, non-empty file.

    Args:
        path: the input.
        what: what it should be, for messages (``"a model checkpoint"``).
        fix: how to get a good one (appended to messages).

    Raises:
        MissingFileError: no such file. BadFileError: a folder, unreadable, or empty.
    """
    path = Path(path)
    hint = f"; {fix}" if fix else ""
    if not path.exists():
        raise MissingFileError(f"{path} does not exist (expected {what}){hint}")
    if path.is_dir():
        raise BadFileError(f"{path} is a folder, not {what}{hint}")
    if not os.access(path, os.R_OK):
        raise BadFileError(f"{path} is not readable (permissions); expected {what}")
    if path.stat().st_size == 0:
        raise BadFileError(f"{path} is empty (0 bytes), not {what} (an interrupted copy or write?){hint}")
    return path


def bad_file(path: str | os.PathLike, what: str, error: BaseException | str, fix: str) -> BadFileError:
    """The one message for an input that exists but cannot be read as ``what``."""
    detail = error if isinstance(error, str) else _first_line(error)
    if "contains pickled (object) data" in detail:  # numpy's words for "neither .npy nor .npz"
        detail = "not a NumPy .npy or .npz file"
    return BadFileError(f"{path} is not {what}: it is corrupt, truncated or another kind of file ({detail}); {fix}")


def load_checkpoint(path: str | os.PathLike, expected_format: str | None = None,
                    required: tuple[str, ...] = (), fix: str | None = None) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no code runs from the file).

    Args:
        path: the file.
        expected_format: its ``format`` tag; None accepts any flowforce checkpoint.
        required: keys it must hold.
        fix: what the user should do with a bad file (default: re-create it).

    Raises:
        MissingFileError: the file does not exist.
        BadFileError: the file is empty, corrupt, truncated, or not a checkpoint of the
            expected format; the message names the file and what to do.
        UnsafeFileError: the file holds Python objects other than tensors and plain data
            (which ``weights_only`` refuses to unpickle: they could run code).
    """
    import pickle

    import torch

    what = KNOWN_FORMATS.get(expected_format or "", "a flowforce checkpoint")
    fix = fix or "re-create it by re-running the command that wrote it"
    path = require_input_file(path, what, fix)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
        if found:  # a pickle that names code: refused by weights_only, and said so
            raise UnsafeFileError(f"{path} holds a pickled Python object ({found.group(1)}), not only tensors and "
                                  "plain data; flowforce loads checkpoints with weights_only=True and does not "
                                  "unpickle such objects (that could run code). Re-create the file with "
                                  "flowforce") from None
        raise bad_file(path, what, "not a PyTorch checkpoint", fix) from None
    except Exception as exc:  # torch raises several types for truncated/garbled files
        raise bad_file(path, what, exc, fix) from None
    found = obj.get("format") if isinstance(obj, dict) else None
    if not isinstance(obj, dict) or (expected_format and found != expected_format):
        kind = KNOWN_FORMATS.get(found, f"format {found!r}" if found else f"a plain {type(obj).__name__}")
        raise BadFileError(f"{path} is {kind}, not {what}; pass the right file or {fix}")
    missing = [key for key in required if key not in obj]
    if missing:
        raise BadFileError(f"{path} is {what} without {', '.join(missing)}: it is incomplete or was altered; {fix}")
    return obj


def check_outputs(outputs: Mapping[str, str | os.PathLike | None],
                  inputs: Mapping[str, str | os.PathLike | None] | None = None,
                  folders: Mapping[str, str | os.PathLike | None] | None = None) -> None:
    """Check output locations before any work is done, so a long run cannot end in a
    failed write, and no input or other output is overwritten.

    Args:
        outputs: label (e.g. ``"--out"``) → file the command will write; None entries are skipped.
        inputs: label → file the command reads.
        folders: label → folder the command writes files into.

    Raises:
        OutputError: an output resolves to an input (symlinks and hard links included) or to
            another output; it is a folder (or, for ``folders``, a file) or a special file
            such as a device; it is read-only; or its folder is under a file or not writable.
    """
    given_inputs = [(label, Path(p)) for label, p in (inputs or {}).items() if p is not None]
    seen: dict[str, str] = {}
    targets = [(label, Path(p), False) for label, p in outputs.items() if p is not None]
    targets += [(label, Path(p), True) for label, p in (folders or {}).items() if p is not None]
    for label, path, is_folder in targets:
        real = os.path.realpath(path)
        for in_label, in_path in given_inputs:
            same = real == os.path.realpath(in_path)
            if not same and path.exists() and in_path.exists():
                with contextlib.suppress(OSError):
                    same = os.path.samefile(path, in_path)
            if same:
                via = "" if path.absolute() == in_path.absolute() else " (the same file under another name)"
                raise OutputError(f"{label} {path} is the input {in_label} {in_path}{via}: writing it would destroy "
                                  "the input; choose another output name")
        if real in seen:
            raise OutputError(f"{label} {path} and {seen[real]} are the same file; give them different names")
        seen[real] = f"{label} {path}"
        if path.exists():
            if is_folder:
                if not path.is_dir():
                    raise OutputError(f"{label} {path} is a file, not a folder; give a folder name")
            elif path.is_dir():
                raise OutputError(f"{label} {path} is a folder; give a file name, e.g. {path / 'NAME'}")
            elif not path.is_file():
                raise OutputError(f"{label} {path} exists and is not a regular file (a device or pipe?); "
                                  "give a file name")
            if not os.access(path, os.W_OK):
                raise OutputError(f"{label} {path} exists and is read-only; make it writable or choose another name")
        # The first existing folder above must be a writable folder (missing ones are created).
        ancestor = path.absolute().parent if not (is_folder and path.is_dir()) else path.absolute()
        while not ancestor.exists() and not ancestor.is_symlink():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise OutputError(f"{label} {path}: cannot create it, {ancestor} is a file, not a folder")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise OutputError(f"{label} {path}: the folder {ancestor} is not writable; choose another location")


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
