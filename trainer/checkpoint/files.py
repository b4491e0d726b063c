"""Checkpoint files: written durably with their SHA-256, read without running code.

:func:`save_file` hashes the bytes while ``torch.save`` writes them (no second read)
and fsyncs them, so they are on disk before the checkpoint directory is renamed into
place. :func:`load_file` reads with ``weights_only=True``: tensors and plain
containers only, nothing in the file is executed. :func:`write_error` turns a failed
write (an ``OSError``, or the ``RuntimeError`` torch's zip writer raises for one) into
one line naming the file and the cause.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common.atomic import OutputWriteError
from trainer.checkpoint.errors import CheckpointError
from trainer.preflight import _size

#: Free space under which a write error that names no cause is taken for a full disk.
LOW_SPACE_BYTES = 16 << 20


class _HashingWriter:
    """A binary file wrapper that hashes what is written through it."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.hash = hashlib.sha256()

    def write(self, data: Any) -> int:
        self.hash.update(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def save_file(obj: Any, path: Path) -> str:
    """``torch.save`` then fsync, so the bytes are durable before the rename; returns
    the SHA-256 of the bytes written (hashed on the way, not read back)."""
    with open(path, "wb") as fh:
        writer = _HashingWriter(fh)
        torch.save(obj, writer)
        fh.flush()
        os.fsync(fh.fileno())
    return writer.hash.hexdigest()


def load_file(path: Path, map_location: torch.device | str = "cpu", mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` of one checkpoint file. A file that is not
    ours, truncated or corrupt raises :class:`CheckpointError` naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a readable checkpoint file of this trainer "
            f"(truncated, corrupt, or holding objects other than tensors): {_first_line(exc)}"
        ) from None


def fsync_path(path: Path) -> None:
    """Flush a directory entry (or file) to disk: a rename is durable after this."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _os_error_in(exc: BaseException) -> OSError | None:
    """The first :class:`OSError` in ``exc``'s chain (itself, its cause or context):
    torch's zip writer turns the ``OSError`` of a failed ``write`` into a
    ``RuntimeError`` (``[enforce fail at inline_container.cc:...] unexpected pos``)
    raised during its handling."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _free_bytes(path: Path) -> int | None:
    """Free bytes on the file system of ``path`` (its nearest existing parent)."""
    for where in (path, *path.parents):
        try:
            return shutil.disk_usage(where).free
        except OSError:
            continue
    return None


def write_error(path: str | os.PathLike[str], exc: BaseException) -> OutputWriteError:
    """A failed write of ``path`` as one line, ``cannot write <path>: <cause>``.

    ``exc`` is the :class:`OSError` of the write or the ``RuntimeError`` torch's writer
    raised for one. The cause is the ``OSError``'s in ``exc``'s chain (``No space left
    on device``, with the free space); without one, a file system with less than
    :data:`LOW_SPACE_BYTES` free is taken for a full disk; otherwise it is the writer's
    first line. An :class:`OutputWriteError` passes unchanged."""
    if isinstance(exc, OutputWriteError):
        return exc
    path = Path(path)
    os_error = _os_error_in(exc)
    code = os_error.errno if os_error is not None else None
    if code is not None:
        reason = os.strerror(code)
    elif os_error is not None:
        reason = os_error.strerror or _first_line(os_error)
    else:
        free = _free_bytes(path)
        if free is not None and free < LOW_SPACE_BYTES:
            code, reason = errno.ENOSPC, os.strerror(errno.ENOSPC)
        else:
            reason = f"{type(exc).__name__}: {_first_line(exc)}"
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(path)
        if free is not None:
            reason = f"{reason} ({_size(free)} free there)"
    return OutputWriteError(code, reason, str(path))


def attempt(fn: Callable[..., Any], *args: Any) -> str | None:
    """Run ``fn(*args)``; return ``None``, or its failure (an ``OSError``, or the
    ``RuntimeError`` of torch's writer) as one line naming the file. Collective code
    reports the line to every rank instead of raising on one."""
    try:
        fn(*args)
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, OSError) and exc.filename is not None:
            return str(write_error(exc.filename, exc))
        return " ".join(str(exc).split()) or type(exc).__name__
    return None
