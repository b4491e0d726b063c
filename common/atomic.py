"""Atomic output files: write a temporary sibling, fsync it, then ``os.replace``.

A reader never sees a half-written file, and a crash leaves the previous file
(if any) in place. This module is the one home of that pattern: every command
that writes outputs (RecordIO ``.rec``/``.idx`` and ``property``, Arrow shards and
manifests, the synthetic dataset, evaluation results, cleaning reports) uses it.

Three shapes, one mechanism (:class:`AtomicFile`):

* :func:`atomic_open` — a context manager yielding an open file object;
* :func:`atomic_path` — a context manager yielding a temporary *path*, for writers
  that insist on opening the file themselves (``pyarrow.OSFile``);
* :class:`AtomicFile` itself — for a file that stays open across calls (the RecordIO
  writer), committed or discarded explicitly.

Plus one-call writers: :func:`write_bytes`, :func:`write_text`, :func:`write_json`,
:func:`write_torch`, and :func:`append_text` for append-only logs (``bad_steps.jsonl``).

Failures name the file: an :class:`OSError` that names no file of its own (a full
disk, a read-only file system, ... while writing or renaming the temporary file) is
raised as :class:`OutputWriteError` (an :class:`OSError` with the same ``errno``),
``cannot write <path>: <reason>``, and the temporary file is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


class OutputWriteError(OSError):
    """An output file could not be written: ``cannot write <path>: <reason>``.

    An :class:`OSError` (``errno``, ``strerror`` and ``filename`` set as usual), so
    ``except OSError`` keeps working; :meth:`wrap` builds one from the original error."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"

    @classmethod
    def wrap(cls, path: str | os.PathLike[str], exc: OSError) -> OutputWriteError:
        """``exc`` (raised while writing ``path``) as an error naming ``path``."""
        if isinstance(exc, cls):
            return exc
        reason = exc.strerror or str(exc) or type(exc).__name__
        if exc.filename is not None and os.fspath(exc.filename) != os.fspath(path):
            reason = f"{reason}: {os.fspath(exc.filename)}"  # e.g. its directory
        return cls(exc.errno, reason, os.fspath(path))


@contextlib.contextmanager
def naming(path: str | os.PathLike[str]) -> Iterator[None]:
    """Raise an :class:`OSError` that names no file, inside the block, as an
    :class:`OutputWriteError` naming ``path`` (errors about another file pass as they are)."""
    try:
        yield
    except OutputWriteError:
        raise
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OutputWriteError.wrap(path, exc) from exc


def _fsync_directory(directory: str) -> None:
    """Make a rename inside ``directory`` durable (the rename lives in the directory's
    entries, not in the file). Some file systems refuse to fsync a directory; the
    rename itself has still happened, so that is not an error."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicFile:
    """A temporary sibling of ``path`` that becomes ``path`` on :meth:`commit`.

    Args:
        path: the final file name; missing parent directories are created.
        mode: open the temporary file in this mode (``"w"``, ``"wb"``, ...) and expose it
            as :attr:`file`; ``None`` leaves it closed for a writer that opens
            :attr:`tmp` by name.

    The temporary file is ``.<name>.<random>.tmp`` in the same directory (same file
    system, so :func:`os.replace` is atomic). :meth:`commit` flushes and fsyncs it,
    makes it world-readable (0644; ``mkstemp`` creates 0600), renames it over ``path``
    and fsyncs the directory. :meth:`discard` removes it and leaves ``path`` untouched.
    """

    def __init__(self, path: str | os.PathLike[str], mode: str | None = "wb") -> None:
        self.path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(
                prefix=f".{os.path.basename(self.path)}.", suffix=".tmp", dir=directory
            )
        except OSError as exc:
            raise OutputWriteError.wrap(self.path, exc) from exc
        self._directory = directory
        self.tmp = tmp
        self.file: IO[Any] | None = None
        self._done = False
        if mode is None:
            os.close(fd)
        else:
            try:
                self.file = os.fdopen(fd, mode)
            except BaseException:
                os.close(fd)
                os.unlink(tmp)
                raise

    def commit(self) -> None:
        """Make the written bytes durable and move them to ``path``."""
        if self._done:
            raise ValueError(f"{self.path}: atomic write already committed or discarded")
        try:
            if self.file is not None:
                self.file.flush()
                os.fsync(self.file.fileno())
                self.file.close()
                self.file = None
            else:  # written by name by another writer, which has closed it
                fd = os.open(self.tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.chmod(self.tmp, 0o644)
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self.discard()
            raise OutputWriteError.wrap(self.path, exc) from exc
        except BaseException:
            self.discard()
            raise
        self._done = True
        _fsync_directory(self._directory)

    def discard(self) -> None:
        """Close and delete the temporary file; ``path`` keeps its previous content (if any).
        Safe to call more than once, and after a failed :meth:`commit`."""
        if self._done:
            return
        self._done = True
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None
        with contextlib.suppress(OSError):  # never mask the error that led here
            os.unlink(self.tmp)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` (parents created); on success it is
    fsynced, made world-readable (0644) and replaces ``path``; on error it is removed
    (an :class:`OSError` naming no file becomes :class:`OutputWriteError` naming ``path``)."""
    target = AtomicFile(path, mode)
    try:
        assert target.file is not None  # a mode was given
        with naming(path):
            yield target.file
    except BaseException:
        target.discard()
        raise
    target.commit()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for a writer that opens files by name;
    once the block exits normally (the writer having closed the file) the file is
    fsynced and replaces ``path``; on error it is removed."""
    target = AtomicFile(path, None)
    try:
        with naming(path):
            yield Path(target.tmp)
    except BaseException:
        target.discard()
        raise
    target.commit()


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically write ``data``."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Atomically write a UTF-8 text file with ``\\n`` line ends."""
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(
    path: str | os.PathLike[str],
    obj: Any,
    indent: int | None = 2,
    sort_keys: bool = True,
    default: Callable[[Any], Any] | None = None,
) -> None:
    """Atomically write ``obj`` as JSON followed by a newline.

    ``indent``, ``sort_keys`` and ``default`` are :func:`json.dump`'s (``default``
    converts objects JSON does not know, e.g. numpy scalars)."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=indent, sort_keys=sort_keys, default=default)
        f.write("\n")


def write_torch(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomically ``torch.save`` ``obj`` (loadable with ``torch.load(path)``)."""
    import torch  # here, so that text and JSON writers do not need torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def append_text(path: str | os.PathLike[str], text: str) -> None:
    """Append ``text`` (UTF-8) to ``path`` (created with its parents if missing) in one
    ``write``, fsynced. If the write fails, the file is cut back to its previous
    length (no half line) and :class:`OutputWriteError` names ``path``."""
    data = text.encode()
    with naming(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
