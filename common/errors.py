"""The base classes of expected failures.

A failure caused by what the user gave (a file, an option, a model) or by the
environment (a full disk, a busy directory) is *expected*: a command reports it as one
line naming the file, option or key, and exits 1 (2 for a bad option or argument).
Anything else is a bug and keeps its traceback (:func:`common.cli.run_main`).

Library error types derive from :class:`UserError` (``DataError``, ``ConfigError``,
``CheckpointError``, ...), usually together with the builtin they refine
(``class DataError(UserError, ValueError)``) so that ``except ValueError`` keeps working.
:class:`OSError` is expected too: it names the file and the reason on its own.
"""

from __future__ import annotations


class UserError(Exception):
    """An expected failure: printed as one line, exit code :attr:`exit_code`."""

    exit_code = 1


class UsageError(UserError):
    """A bad option or argument (exit code 2, as argparse uses)."""

    exit_code = 2


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (its type name when it has no message)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
