"""The evaluation commands' JSON output: always valid JSON.

Every JSON file or text that ``eval`` writes goes through :func:`dumps` (or
:func:`write_json`, atomically): ``allow_nan=False``, so ``NaN`` and ``Infinity`` (which
strict JSON readers reject) are never written. The commands check their numbers before
(a non-finite embedding, score or label is refused with a message naming the model or
the file), so a non-finite value here is a bug: it is reported with its key.
:func:`printable` shows a file name as valid UTF-8 text, for output files, messages and JSON.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from common.atomic import write_text


def printable(path: str | os.PathLike[str]) -> str:
    """``path`` as valid UTF-8 text: a file name that is not UTF-8 shows its
    undecodable bytes as ``\\xNN`` (for output files, messages and JSON)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _first_non_finite(obj: Any, where: str = "") -> str | None:
    """The key path (``a.b[2]``) of the first NaN or infinite float in ``obj``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "<top>"
    if isinstance(obj, dict):
        for key, value in obj.items():
            found = _first_non_finite(value, f"{where}.{key}" if where else str(key))
            if found:
                return found
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            found = _first_non_finite(value, f"{where}[{i}]")
            if found:
                return found
    return None


def dumps(obj: Any, *, indent: int | None = 2, sort_keys: bool = True, source: str = "") -> str:
    """``json.dumps(obj, allow_nan=False)``; a non-finite number raises ``ValueError``
    naming ``source`` (the file it was for) and its key."""
    try:
        return json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=False)
    except ValueError:
        key = _first_non_finite(obj)
        raise ValueError(
            f"{source or 'JSON output'}: refusing to write the non-finite number at {key} "
            "(not valid JSON)"
        ) from None


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomically write ``obj`` as strict JSON (:func:`dumps`) and a newline."""
    write_text(path, dumps(obj, source=os.fspath(path)) + "\n")
