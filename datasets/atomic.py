"""Atomic output files: write a temporary sibling, fsync it, then ``os.replace``.

A reader never sees a half-written file, and a crash leaves the previous file
(if any) in place. Every command that writes outputs (RecordIO index, Arrow
manifests, the synthetic dataset, evaluation results, cleaning reports) uses this.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` (parents created); on success it is
    fsynced, made world-readable (0644) and replaces ``path``; on error it is removed."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically write ``data``."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Atomically write a UTF-8 text file with ``\\n`` line ends."""
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> None:
    """Atomically write ``obj`` as indented, key-sorted JSON."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=indent, sort_keys=True)
        f.write("\n")
