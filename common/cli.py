"""The one error path of every command (``train_dist.py`` and each ``python -m`` entry).

::

    if __name__ == "__main__":
        sys.exit(run_main(main, prog="datasets.prepare"))

An expected failure (:class:`~common.errors.UserError` or :class:`OSError`) becomes
one line on stderr, ``<prog>: error: <message>``, and exit code 1 (2 for a
:class:`~common.errors.UsageError`); Ctrl-C is exit code 130 without a traceback. Any
other exception is a bug and propagates with its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from common.errors import UserError, one_line


def describe_os_error(exc: OSError) -> str:
    """``<file>: <reason>`` for an :class:`OSError` (its own ``str`` when it names no
    file, or when it is one of ours whose message already names everything)."""
    if type(exc).__str__ is not OSError.__str__ or exc.filename is None:
        return one_line(exc)
    where = os.fsdecode(exc.filename)
    if exc.filename2 is not None:
        where = f"{where} -> {os.fsdecode(exc.filename2)}"
    return f"{where}: {exc.strerror or type(exc).__name__}"


def expected_failure(exc: BaseException) -> tuple[int, str] | None:
    """``(exit code, one-line message)`` for an expected failure, ``None`` for a bug."""
    if isinstance(exc, UserError):
        return exc.exit_code, one_line(exc)
    if isinstance(exc, OSError):
        return 1, describe_os_error(exc)
    return None


def run_main(
    main: Callable[[Sequence[str] | None], Any],
    argv: Sequence[str] | None = None,
    prog: str | None = None,
) -> int:
    """Run ``main(argv)`` and turn its outcome into an exit code.

    ``main`` returns an ``int`` exit code or anything else (success, 0). Expected
    failures print one line (see the module docstring); a bug keeps its traceback.
    """
    name = prog or os.path.basename(sys.argv[0] or "command")
    try:
        result = main(argv)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        failure = expected_failure(exc)
        if failure is None:
            raise
        code, message = failure
        print(f"{name}: error: {message}", file=sys.stderr)
        return code
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
