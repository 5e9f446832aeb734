"""One family for every error qgdist reports to a user: ``QgdistError`` and its subclasses.

A ``QgdistError`` is the user's to fix (a bad option, a bad row, data that does not fit a model, a checkpoint of
another run), never a bug: the command line prints it as one line, ``qgdist COMMAND: message``, and exits with
status 2 (``qgdist.cli.main``); anything else is a bug and keeps its traceback.

Like uproot's errors, each carries *where* it happened as fields -- ``file``, ``row``, ``field``, ``expected``,
``got`` -- so code and tests can act on them without parsing the message; ``hint`` is an optional second line that
says what to do about it.

The subclasses also derive from the built-in exception a caller would have caught before (``ValueError`` for bad
input, ``RuntimeError`` for state), so ``except ValueError`` around a qgdist call keeps working.
"""

from __future__ import annotations

from typing import Any


class QgdistError(Exception):
    """An error the user can act on; ``str(err)`` is the one-line message, ``hint`` what to do about it."""

    hint: str = ""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None, field: str | None = None,
                 expected: Any = None, got: Any = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.file, self.row, self.field, self.expected, self.got = file, row, field, expected, got
        if hint is not None:
            self.hint = hint


class ConfigError(QgdistError, ValueError):
    """Settings that do not make a valid config (a required flag missing, a value out of range, a bad --config
    file). ``field`` names the setting."""


class InputError(QgdistError, ValueError):
    """Input data that cannot be used as given: a missing or unreadable file, a bad row, a shard of another schema."""


class IncompatibleCheckpoint(QgdistError, RuntimeError):
    """A checkpoint that cannot be used here: another training config, another dataset, an unknown layout."""


class ClusterError(QgdistError, RuntimeError):
    """The cluster could not be reached, refused us, or does not know the job; the message says what to do."""
