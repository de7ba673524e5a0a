"""What every ``flowforce`` command checks at its boundary, before any work: its options
(flags and YAML keys, one :class:`~openmm_flowforce.options.Option` each) and its files.

* :func:`flag` turns an :class:`~openmm_flowforce.options.Option` into an argparse ``type=``,
  so ``--epochs 0`` fails while parsing, with the same rule as ``epochs: 0`` in a config.
* :func:`load_config` reads a YAML mapping and checks it against a schema of options;
  unknown keys are rejected by name (never silently ignored), sections key by key.
* :class:`CommandFiles` is what a command declares it reads and writes; ``main`` checks
  the outputs against the inputs and the file system before the command runs
  (:func:`openmm_flowforce.io.check_outputs`) and reports them after a Ctrl-C.
"""
from __future__ import annotations

import argparse
import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from openmm_flowforce.errors import BadFileError, FlowforceError, MissingFileError, OptionError
from openmm_flowforce.options import Option, check_options

PathLike = str | os.PathLike | None


def flag(option: Option) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses and checks a flag's text with ``option``."""
    def parse(text: str) -> Any:
        try:
            return option.parse(text)
        except OptionError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = option.kind.__name__  # argparse names the type in some messages
    return parse


@dataclass
class CommandFiles:
    """The files one command run reads and writes, by the flag that names them.

    Attributes:
        inputs: label → file read (``"DATA.npz"``, ``"--topology"``); None entries are skipped.
        outputs: label → file written.
        folders: label → folder written into (``flowforce demo --out DIR``).
        resumable: re-running the same command continues from what it wrote.
    """

    inputs: dict[str, PathLike] = field(default_factory=dict)
    outputs: dict[str, PathLike] = field(default_factory=dict)
    folders: dict[str, PathLike] = field(default_factory=dict)
    resumable: bool = False


def load_config(path: str | Path | None, schema: Mapping[str, Option]) -> dict[str, Any]:
    """Read a YAML mapping and check its keys and values against ``schema``.

    Returns:
        The checked options (numbers normalised); ``{}`` without a file or for an empty one.

    Raises:
        MissingFileError: no such file. BadFileError: not UTF-8 text, not valid YAML, or not
            a mapping. OptionError: unknown keys (listing the valid ones) or bad values
            (naming the key, the value and what is allowed).
    """
    if path is None:
        return {}
    import yaml

    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"config file {path} does not exist")
    if not path.is_file():
        raise BadFileError(f"config file {path} is not a file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise BadFileError(f"config file {path} is not text (not UTF-8); it should be YAML options") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise BadFileError(f"config file {path} is not valid YAML{at}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BadFileError(f"config file {path} must hold a mapping of options (key: value lines), "
                           f"got a {type(data).__name__}")
    return check_options(data, schema, str(path))


def section(schema: Mapping[str, Option]) -> Option:
    """A config section (a nested mapping) whose keys follow ``schema``."""
    return Option(dict, fields=schema)



#: Modules that still raise plain ``ValueError`` / ``FileNotFoundError`` for a user's
#: mistake (they are being rewritten to raise :class:`~openmm_flowforce.errors.FlowforceError`;
#: then this list and :func:`legacy_user_errors` go).
LEGACY_MODULES = ("openmm_flowforce.export.backends", "openmm_flowforce.export.torchscript",
                  "openmm_flowforce.export.cg")


@contextlib.contextmanager
def legacy_user_errors() -> Iterator[None]:
    """Treat a ``ValueError`` or ``FileNotFoundError`` raised in :data:`LEGACY_MODULES` as a
    user error; the same types raised anywhere else (numpy, torch, a bug) still propagate."""
    try:
        yield
    except FlowforceError:
        raise
    except (ValueError, FileNotFoundError) as error:
        frame = error.__traceback__
        while frame is not None and frame.tb_next is not None:
            frame = frame.tb_next
        if frame is not None and frame.tb_frame.f_globals.get("__name__") in LEGACY_MODULES:
            raise FlowforceError(str(error)) from error
        raise
