"""Output directories a command owns: claimed by a manifest, locked for the run.

Every command that writes a directory (``datasets.prepare``, training, ...) opens it
through :class:`OwnedDir`:

* **Ownership.** The manifest ``.owner.json`` names the command that made the
  directory. A non-empty directory without it, or one made by another command, is
  refused, naming what is there, unless the user passed the command's overwrite option
  (``--overwrite``, ``train.overwrite=true``). A command deletes only files that its
  manifest lists or that it just created (:meth:`OwnedDir.owns`), never anything else.
* **One run at a time.** :class:`OutputLock` holds ``.lock`` with ``flock`` for the
  run; a second run is refused, naming the first (host, PID, start time). A lock left
  by a killed run is stale and taken over with a warning.
* **Completeness.** The manifest says ``"complete": false`` while a run writes and
  ``true`` (with the list of outputs) once the last output is in place: the manifest
  is the last write, and readers check it (:func:`check_complete`).
* **No symlink games.** Lock and probe files are opened with ``O_NOFOLLOW`` (and the
  probe with ``O_EXCL``) and must be regular files: a lock file that another user
  pointed at one of your files is refused, and that file is left untouched.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

from common.atomic import write_json
from common.errors import UserError

LOCK_NAME = ".lock"
MANIFEST_NAME = ".owner.json"
MANIFEST_FORMAT = 1
_MANIFEST_MAX_BYTES = 16 << 20  # a manifest lists file names: far below this
_LOCK_MAX_BYTES = 4096


class OutputDirError(UserError, OSError):
    """An output directory cannot be used; the message names it and the reason."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "output directory error"


class OutputLockedError(OutputDirError):
    """The directory is in use by another run; the message names it."""


def _now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %z")


def open_nofollow(path: str | os.PathLike[str], flags: int, mode: int = 0o644) -> int:
    """``os.open`` that refuses a symlink (``O_NOFOLLOW``) and anything but a regular
    file (a FIFO, device or socket: opened non-blocking, checked, then refused).

    Raises:
        OSError: ``ELOOP`` for a symlink, ``EINVAL`` for a non-regular file; ``filename``
            set to ``path``.
    """
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _refuse_link(path: Path, what: str) -> OutputDirError:
    return OutputDirError(
        f"{what} {path} is a symlink or not a regular file; refusing to follow or "
        "overwrite it (remove it if it is yours)"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another run (its lock file is still being written)"
    return (
        f"job PID {holder.get('pid', '?')} on {holder.get('host', '?')} since "
        f"{holder.get('started', '?')}"
    )


def _read_holder(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, _LOCK_MAX_BYTES)
    try:
        holder = json.loads(raw.decode()) if raw.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        # the content is never echoed: a lock file is no channel for another's bytes
        return {"pid": "?", "host": "?", "started": "? (unreadable lock file)"}
    return holder if isinstance(holder, dict) else None


class OutputLock:
    """The run lock of ``directory`` (which exists): :meth:`acquire`, then :meth:`release`.

    Args:
        directory: the output directory.
        option: the option that names the directory in messages (``"train.output"``,
            ``"OUT"``): ``train.output='runs/r50' is in use by ...``.
        command: recorded in the lock file (``"train"``, ``"datasets.prepare"``).

    ``stale`` is set to the previous holder's description when a lock left by a dead
    run was taken over (for the caller to report). Where the file system refuses
    ``flock``, the lock falls back to the file's content: it is stale when its holder
    ran on this host and that PID is gone.
    """

    def __init__(
        self, directory: str | os.PathLike[str], option: str = "directory", command: str = "run"
    ) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.option = option
        self.label = f"{option}={str(self.directory)!r}"
        self.command = command
        self.stale: str | None = None
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        """Take the lock or raise :class:`OutputLockedError` naming its holder."""
        for _ in range(10):  # retried only when a releasing run removed the file under us
            fd = self._open()
            try:
                if self._lock_fd(fd) and self._still_ours(fd):
                    self._claim(fd)
                    self._fd = fd
                    return self
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise OutputLockedError(f"could not take {self.path}: it keeps being replaced")

    def _open(self) -> int:
        try:
            return open_nofollow(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            pass
        try:  # a lock file left behind (stale or held): open it, never through a link
            return open_nofollow(self.path, os.O_RDWR)
        except FileNotFoundError:  # released between the two opens: start again
            return self._open()
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EINVAL, errno.EMLINK):
                raise _refuse_link(self.path, f"{self.label}: the lock file") from None
            raise

    def _lock_fd(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            self._refuse(_read_holder(fd))
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
        holder = _read_holder(fd)  # no flock here: the PID check alone
        if holder and not self._dead(holder):
            self._refuse(holder)
        return True

    def _still_ours(self, fd: int) -> bool:
        """Whether ``self.path`` is still the file ``fd`` locked (a run releasing its
        lock unlinks the file; a lock on the unlinked inode protects nothing)."""
        try:
            return os.lstat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _claim(self, fd: int) -> None:
        previous = _read_holder(fd)
        if previous:  # the file outlived its holder: a killed run's
            self.stale = _describe(previous)
        record = {
            "command": self.command,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _now(),
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)

    @staticmethod
    def _dead(holder: dict[str, Any]) -> bool:
        pid = holder.get("pid")
        if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
            return False  # another host's process cannot be checked from here
        return pid != os.getpid() and not _pid_alive(pid)

    def _refuse(self, holder: dict[str, Any] | None) -> None:
        raise OutputLockedError(
            f"{self.label} is in use by {_describe(holder)} (lock file {self.path}); wait "
            f"for it to end or use another {self.option} (if no such job runs, delete the "
            "lock file)"
        )

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)  # while still holding it: no one takes a dying file
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def probe_directory(path: str | os.PathLike[str], what: str, tag: str = "0", fix: str = "") -> None:
    """Create ``path`` if needed, then write, fsync and remove a 4 KiB probe file in it.

    The probe (``.write-probe-<tag>-<pid>``) is created with ``O_EXCL|O_NOFOLLOW``: a
    name planted in advance (a symlink to another file) is refused, never written
    through. Raises :class:`OutputDirError` starting with ``what``.
    """
    hint = f"; {fix}" if fix else ""
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"{what} cannot be created: {_reason(exc)}{hint}") from None
    if not directory.is_dir():
        raise OutputDirError(f"{what} is not a directory{hint}")
    probe = directory / f".write-probe-{tag}-{os.getpid()}"
    try:
        fd = open_nofollow(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        raise OutputDirError(
            f"{what}: {probe} already exists (not made by this process); refusing to "
            "write through it"
        ) from None
    except OSError as exc:
        raise OutputDirError(f"{what} is not writable: {_reason(exc)}{hint}") from None
    try:
        os.write(fd, b"\0" * 4096)
        os.fsync(fd)
    except OSError as exc:
        raise OutputDirError(f"{what} is not writable: {_reason(exc)}{hint}") from None
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ownership manifest of ``directory`` (``None`` if it has none).

    Raises:
        OutputDirError: the manifest is a symlink, too large, or not a JSON object.
    """
    path = Path(directory) / MANIFEST_NAME
    try:
        fd = open_nofollow(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EINVAL, errno.EMLINK):
            raise _refuse_link(path, "the ownership manifest") from None
        raise
    with os.fdopen(fd, "rb") as fh:
        raw = fh.read(_MANIFEST_MAX_BYTES + 1)
    try:
        if len(raw) > _MANIFEST_MAX_BYTES:
            raise ValueError("larger than 16 MiB")
        manifest = json.loads(raw.decode())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("command"), str):
            raise ValueError("not an object with a 'command'")
    except (ValueError, UnicodeDecodeError) as exc:
        raise OutputDirError(f"{path}: not an ownership manifest ({exc})") from None
    return manifest


def check_complete(directory: str | os.PathLike[str], what: str = "") -> None:
    """Refuse to read ``directory`` while a run is still writing it (or was killed
    before its outputs were all in place). A directory without a manifest is not ours
    to judge and passes."""
    manifest = read_manifest(directory)
    if manifest is not None and not manifest.get("complete", False):
        raise OutputDirError(
            f"{what or directory}: incomplete output of {manifest['command']} (still "
            f"running, or stopped before it finished; see {Path(directory) / MANIFEST_NAME}); "
            f"rerun {manifest['command']} to finish it"
        )


class OwnedDir:
    """An output directory that one command owns, locked for one run.

    Args:
        path: the directory (created with its parents if missing).
        command: the owning command's name, recorded in the manifest
            (``"datasets.prepare"``, ``"train"``).
        option: how messages name the directory (``"train.output"``, ``"OUT"``).
        overwrite: write into a non-empty directory that another command (or none) made;
            the user's explicit choice (``overwrite_option``).
        overwrite_option: the option that sets ``overwrite``, for the refusal message.
        lock: take the directory's run lock (every rank but one passes ``False``).

    Use as a context manager or :meth:`open`/:meth:`close`. :meth:`commit` records the
    outputs and marks the directory complete.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        command: str,
        option: str,
        overwrite: bool = False,
        overwrite_option: str = "--overwrite",
        lock: bool = True,
    ) -> None:
        self.path = Path(path)
        self.command = command
        self.option = option
        self.overwrite = overwrite
        self.overwrite_option = overwrite_option
        self.label = f"{option}={str(self.path)!r}"
        self.lock = OutputLock(self.path, option, command) if lock else None
        self.files: list[str] = []
        self.created = _now()
        self.adopted = False

    @property
    def stale(self) -> str | None:
        """The dead run whose lock was taken over, if any."""
        return self.lock.stale if self.lock else None

    def open(self) -> OwnedDir:
        """Create, lock and claim the directory; refuse one that is not ours."""
        if self.path.is_symlink() and not self.path.exists():
            raise OutputDirError(f"{self.label} is a dangling symlink")
        if self.path.exists() and not self.path.is_dir():
            raise OutputDirError(f"{self.label} exists and is not a directory")
        if str(self.path.resolve()) == os.path.abspath(os.sep):
            raise OutputDirError(f"{self.label}: the root directory cannot be an output")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputDirError(f"{self.label} cannot be created: {_reason(exc)}") from None
        if self.lock is not None:
            self.lock.acquire()
        try:
            self._claim()
        except BaseException:
            self.close()
            raise
        return self

    def _claim(self) -> None:
        manifest = read_manifest(self.path)
        if manifest is not None and manifest["command"] == self.command:
            self.files = [str(f) for f in manifest.get("files", [])]
            self.created = str(manifest.get("created", self.created))
        elif not self.overwrite:
            if manifest is not None:
                raise OutputDirError(
                    f"{self.label} was made by {manifest['command']}, not {self.command}; "
                    f"choose another directory (or pass {self.overwrite_option})"
                )
            foreign = self.foreign_entries()
            if foreign:
                shown = ", ".join(foreign[:5]) + (
                    f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
                )
                raise OutputDirError(
                    f"{self.label} is not empty and was not made by {self.command} (it holds "
                    f"{shown}); choose a new or empty directory, or pass "
                    f"{self.overwrite_option} to write into it (files this run does not "
                    "write are kept)"
                )
        else:
            self.adopted = True
        self._write_manifest(complete=False)

    def foreign_entries(self) -> list[str]:
        """Entries of the directory other than this module's own files, sorted."""
        ours = {LOCK_NAME, MANIFEST_NAME}
        return sorted(
            name
            for name in os.listdir(self.path)
            if name not in ours and not name.startswith(".write-probe-")
        )

    def owns(self, name: str) -> bool:
        """Whether this command wrote ``name`` (relative to the directory): listed in
        the manifest, or recorded by this run."""
        name = name.rstrip("/")
        return any(name == f or name.startswith(f.rstrip("/") + "/") for f in self.files)

    def record(self, *names: str) -> None:
        """Note outputs this run is about to write (so that a later run may replace or
        delete them); persisted in the manifest at once."""
        new = [n for n in names if n not in self.files]
        if new:
            self.files.extend(new)
            self._write_manifest(complete=False)

    def commit(self, *names: str) -> None:
        """All outputs are in place: record ``names`` and mark the directory complete."""
        self.files.extend(n for n in names if n not in self.files)
        self._write_manifest(complete=True)

    def _write_manifest(self, complete: bool) -> None:
        write_json(
            self.path / MANIFEST_NAME,
            {
                "format": MANIFEST_FORMAT,
                "command": self.command,
                "created": self.created,
                "updated": _now(),
                "complete": complete,
                "files": self.files,
            },
        )

    def close(self) -> None:
        """Release the lock (the manifest stays)."""
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> OwnedDir:
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()
