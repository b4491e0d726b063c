"""One job per output directory: a lock file in ``train.output``.

Rank 0 takes :class:`OutputLock` after joining the job and before anything is written
(``train.log``, ``config.json``, checkpoints); a second job on the same directory is
refused with a message naming the first::

    train.output='/runs/r100' is in use by job PID 4242 on node07 since
    2026-11-23 10:41:07 (lock file /runs/r100/.train.lock); wait for it to end or use
    another train.output

The lock file ``<train.output>/.train.lock`` holds the holder's host, PID and start
time (JSON) and is held with ``fcntl.flock`` for the life of the job: the kernel (or
the NFS server) releases it when the process dies however it dies, so a lock file left
behind by a killed job is *stale* and is taken over, with a warning. Where the file
system refuses ``flock``, the lock falls back to the file's content: it is stale when
its holder ran on this host and that PID is no longer alive. :meth:`release` (also
on errors: ``train_dist.py`` calls it in a ``finally``) removes the file.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

LOCK_NAME = ".train.lock"


class OutputLockedError(RuntimeError):
    """``train.output`` is in use by another job; the message names it."""


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
        return "another job (its lock file is still being written)"
    return (
        f"job PID {holder.get('pid', '?')} on {holder.get('host', '?')} since "
        f"{holder.get('started', '?')}"
    )


def _read(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        holder = json.loads(raw.decode()) if raw.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"pid": "?", "host": "?", "started": f"? (unreadable lock file: {raw[:60]!r})"}
    return holder if isinstance(holder, dict) else None


class OutputLock:
    """The lock on ``output`` (a directory that exists); :meth:`acquire` it, then
    :meth:`release` it. ``stale`` is set to the previous holder's description when a
    stale lock was taken over (for the caller to report)."""

    def __init__(self, output: str | os.PathLike[str]) -> None:
        self.output = Path(output)
        self.path = self.output / LOCK_NAME
        self.stale: str | None = None
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        """Take the lock or raise :class:`OutputLockedError` naming its holder."""
        for _ in range(10):  # retried only when a releasing job removed the file under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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

    def _lock_fd(self, fd: int) -> bool:
        """flock ``fd``; on a file system without flock, decide from the content."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            self._refuse(_read(fd))
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
        holder = _read(fd)  # no flock here: the PID check alone
        if holder and not self._dead(holder):
            self._refuse(holder)
        return True

    def _still_ours(self, fd: int) -> bool:
        """Whether ``self.path`` still is the file ``fd`` locked (a job releasing its
        lock unlinks the file; a lock on the unlinked inode protects nothing)."""
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _claim(self, fd: int) -> None:
        previous = _read(fd)
        if previous:  # the file outlived its holder: a killed job's
            self.stale = _describe(previous)
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %z"),
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)

    @staticmethod
    def _dead(holder: dict[str, Any]) -> bool:
        """Stale by content: the holder ran on this host and its PID is gone."""
        pid = holder.get("pid")
        if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
            return False  # another host's process cannot be checked from here
        return pid != os.getpid() and not _pid_alive(pid)

    def _refuse(self, holder: dict[str, Any] | None) -> None:
        raise OutputLockedError(
            f"train.output={str(self.output)!r} is in use by {_describe(holder)} "
            f"(lock file {self.path}); wait for it to end or use another train.output "
            f"(if no such job runs, delete the lock file)"
        )

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still holding it: no one can take a dying file
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
