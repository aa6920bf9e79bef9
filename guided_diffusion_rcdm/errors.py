"""The user-error exception types: raised where a mistake in the input is detected.

A `UserError` is a problem the user fixes by changing the command (a flag value, a missing or
empty folder, a checkpoint that does not fit, a failed download, an output folder that cannot be
written): the command line reports its message as one line and exits with `exit_status` (2),
writing nothing. Every other exception is a bug and keeps its traceback. The library raises these
types so that a notebook can catch them too; they subclass the built-in type a caller of the
original would catch (`UsageError` is a `ValueError`).
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input or environment, reported as one line naming what to change."""

    exit_status = 2


class UsageError(UserError, ValueError):
    """A bad flag value or flag combination, or an input path that does not work: one line naming
    the flag or path, and what to do."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""
