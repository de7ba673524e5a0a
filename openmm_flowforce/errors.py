"""The errors the package raises for a user's mistake, and only for those.

Every message the package writes for a bad argument, option or file is a
:class:`FlowforceError`; the ``flowforce`` command prints it as one line and exits with
:attr:`FlowforceError.exit_code` (2 for bad input). Anything else that escapes a command
(``TypeError``, ``IndexError``, a ``ValueError`` from numpy...) is a bug in the package and
is shown as a traceback, never as "bad input".

``FlowforceError`` derives from ``ValueError`` (and :class:`MissingFileError` also from
``FileNotFoundError``) so that code written against the older plain exceptions keeps
catching them. This module imports nothing: every layer may use it.
"""
from __future__ import annotations

__all__ = ["BadFileError", "FlowforceError", "MissingFileError", "OptionError", "OutputError", "UnsafeFileError",
           "WriteFailedError"]


class FlowforceError(ValueError):
    """A user's mistake: the message names the file, option or value, what was expected,
    and what to do."""

    #: Exit status of the ``flowforce`` command that stops on this error.
    exit_code = 2


class OptionError(FlowforceError):
    """An option (command-line flag, YAML key or keyword argument) has a bad value."""


class MissingFileError(FlowforceError, FileNotFoundError):
    """An input file does not exist."""


class BadFileError(FlowforceError):
    """An input file is empty, truncated, corrupt, or not the kind of file expected."""


class UnsafeFileError(FlowforceError):
    """A file holds something that would run code when read (e.g. an OpenMM ``PythonForce``,
    whose computation is a pickle); it is refused unless the user trusts the file."""


class OutputError(FlowforceError):
    """An output location is unusable (it is an input, a folder, under a file, or not
    writable); raised before any work is done."""


class WriteFailedError(FlowforceError):
    """Writing a finished result failed (disk full, folder removed...). The message says
    where the data were saved instead, if anywhere. Not the user's input, so exit status 1."""

    exit_code = 1
