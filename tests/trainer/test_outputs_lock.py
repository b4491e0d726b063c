"""One job per output directory (``common.outdir``): a second job is refused
naming the first, a lock left by a dead job is taken over, the lock goes on exit, also
on errors. No sleeps: the "first job" is a lock held by this process."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

import train_dist
from common.outdir import LOCK_NAME, OutputLock, OutputLockedError


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _forge(out: Path, pid: int, host: str | None = None) -> Path:
    """A lock file as a job that is gone left it (nobody holds a flock on it)."""
    out.mkdir(parents=True, exist_ok=True)
    record = {"host": host or socket.gethostname(), "pid": pid, "started": "2026-01-02 03:04:05"}
    (out / LOCK_NAME).write_text(json.dumps(record))
    return out / LOCK_NAME


def test_second_job_is_refused_naming_the_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    with OutputLock(out) as first:
        holder = json.loads(first.path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        code = train_dist.main(["configs/demo", f"train.output={out}"])
        err = capsys.readouterr().err
        assert code == 1
        assert err.strip() == (
            f"error: train.output='{out}' is in use by job PID {os.getpid()} on "
            f"{socket.gethostname()} since {holder['started']} (lock file {first.path}); wait "
            "for it to end or use another train.output (if no such job runs, delete the "
            "lock file)"
        )
        assert first.path.exists()  # the refused job left the first one's lock alone
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # and wrote nothing
        with pytest.raises(OutputLockedError, match="is in use by job PID"):
            OutputLock(out).acquire()
    assert not (out / LOCK_NAME).exists()  # released on exit


def test_stale_lock_of_a_dead_job_is_taken_over(tmp_path: Path) -> None:
    dead = _dead_pid()
    path = _forge(tmp_path, dead)
    lock = OutputLock(tmp_path).acquire()
    try:
        assert lock.stale == f"job PID {dead} on {socket.gethostname()} since 2026-01-02 03:04:05"
        assert json.loads(path.read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not path.exists()


def test_without_flock_the_pid_decides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that refuses flock: a live holder on this host (or any holder on
    another host) refuses; a dead PID on this host is stale."""

    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    _forge(tmp_path, os.getppid())  # alive
    with pytest.raises(OutputLockedError, match=f"job PID {os.getppid()} on "):
        OutputLock(tmp_path).acquire()
    _forge(tmp_path, _dead_pid(), host="another-node")
    with pytest.raises(OutputLockedError, match="on another-node since"):
        OutputLock(tmp_path).acquire()
    _forge(tmp_path, _dead_pid())
    lock = OutputLock(tmp_path).acquire()
    assert lock.stale is not None
    lock.release()


def test_lock_is_released_when_the_run_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code = train_dist.main(["configs/demo", f"train.output={out}", f"data.root={tmp_path}/none"])
    assert code == 2 and "config error" in capsys.readouterr().err
    assert (out / "train.log").exists()  # it got past the lock and wrote
    assert not (out / "config.json").exists()  # written only once the run is built
    assert not (out / LOCK_NAME).exists()
    OutputLock(out).acquire().release()  # and the directory can be locked again
