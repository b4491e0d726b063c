"""Output and disk faults outside checkpoints: every file the trainer writes names the
file when writing fails and leaves no temporary behind (``common.atomic``); a
TensorBoard directory that cannot be written fails at start-up, one that breaks later
costs a warning, not the run; the preflight space message never says ``0.00 GiB``."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

import common.atomic as atomic
import train_dist
from common.atomic import OutputWriteError, append_text, write_json
from tests.trainer.test_trainer import (
    TensorLoader,
    dataset,
    make_cfg,
    make_trainer,
)
from trainer.monitor import Monitor, setup_logging
from trainer.preflight import OutputDirError, probe_output

pytestmark = pytest.mark.usefixtures("one_thread")

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_full_disk_while_writing_verification_json_names_it_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y = dataset()
    t = make_trainer(make_cfg(tmp_path), TensorLoader(x, y, 8, 0, 1))
    t.evaluator = lambda model: {"lfw": {"accuracy": 0.5}}
    t.verify()  # a first, good verification.json
    before = (tmp_path / "verification.json").read_text()

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.json, "dump", full)  # the disk fills while writing
    with pytest.raises(OutputWriteError) as info:
        t.verify()
    assert str(info.value) == (
        f"cannot write {tmp_path / 'verification.json'}: No space left on device"
    )
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert _leftovers(tmp_path) == []
    assert (tmp_path / "verification.json").read_text() == before  # previous file intact

    monkeypatch.undo()
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (_ for _ in ()).throw(ENOSPC))
    with pytest.raises(OutputWriteError, match=r"cannot write .*verification\.json: No space"):
        write_json(tmp_path / "verification.json", [1])  # fails at commit: same outcome
    assert _leftovers(tmp_path) == []


def test_backbone_export_on_a_full_disk_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y = dataset()
    t = make_trainer(make_cfg(tmp_path), TensorLoader(x, y, 8, 0, 1))
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (_ for _ in ()).throw(ENOSPC))
    with pytest.raises(OutputWriteError, match=r"cannot write .*backbone\.pt: No space left"):
        t.export_backbone()
    assert _leftovers(tmp_path) == [] and not (tmp_path / "backbone.pt").exists()


def test_append_failure_names_the_file_and_leaves_no_half_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bad_steps.jsonl"
    append_text(path, '{"step": 1}\n')
    real_write = os.write

    def half_then_full(fd: int, data: Any) -> int:
        if len(data) > 4:
            return real_write(fd, bytes(data[:4]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "write", half_then_full)
    with pytest.raises(OutputWriteError, match=r"cannot write .*bad_steps\.jsonl: No space"):
        append_text(path, '{"step": 2}\n')
    monkeypatch.undo()
    assert path.read_text() == '{"step": 1}\n'


def test_unwritable_tensorboard_directory_fails_at_start_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "tensorboard").write_text("a file where the event directory should be")
    # (train.overwrite: the directory holds a file training did not write)
    args = [f"train.output={out}", "log.tensorboard=true", "train.overwrite=true"]
    code = train_dist.main(["configs/demo", *args])
    err = capsys.readouterr().err
    assert code == 1
    assert f"log.tensorboard=true, but '{out / 'tensorboard'}' cannot be created" in err
    assert "set log.tensorboard=false" in err and "Traceback" not in err
    # nothing written but the ownership manifest (the lock is gone)
    assert sorted(p.name for p in out.iterdir()) == [".owner.json", "tensorboard"]


def test_tensorboard_failure_mid_run_warns_once_and_training_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    from tensorboard.summary.writer import record_writer

    monitor = Monitor(True, 10, 0, tmp_path / "tensorboard", False)
    monitor.log_step(1, 0, 1.0, 0.5, 0.1, None)
    monitor.writer.flush()

    def full(self: Any, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        for step in range(2, 6):  # the writer thread fails; its error surfaces later
            monitor.log_step(step, 0, 1.0, 0.5, 0.1, None)
            monitor.log_verification(step, {"lfw": {"accuracy": 0.9}})
        monitor.close()
    warnings = [r.getMessage() for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert warnings == [
        f"cannot write TensorBoard events to {tmp_path / 'tensorboard'}: No space left on "
        "device; TensorBoard logging stops here, training goes on"
    ]
    assert monitor.writer is None
    assert "Exception in thread" not in capfd.readouterr().err  # no thread traceback


def test_train_log_write_failure_is_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging(tmp_path, 0)
    log = logging.getLogger("trainer")
    log.info("first line")
    handler = next(h for h in logging.getLogger().handlers if hasattr(h, "baseFilename"))

    class Full:
        def write(self, text: str) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    handler.stream = Full()
    try:
        log.info("second line")
        log.info("third line")
        err = capsys.readouterr().err
        assert err.strip() == (
            f"warning: cannot write {tmp_path / 'train.log'}: No space left on device; "
            "the file log stops here, stdout goes on"
        )
        assert "Logging error" not in err
    finally:
        logging.getLogger().handlers.clear()
    blocked = tmp_path / "blocked"
    blocked.write_text("")
    with pytest.raises(OutputWriteError, match=r"cannot write .*blocked/train\.log"):
        setup_logging(blocked, 0)
    logging.getLogger().handlers.clear()


def test_space_message_never_says_zero_gib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=3 * 2**20))
    with pytest.raises(OutputDirError) as info:
        probe_output(tmp_path / "out", required_bytes=20 * 2**20 + 1)
    assert "has 3.00 MiB free, but a checkpoint of this run needs about 20.00 MiB" in str(
        info.value
    )
    assert "0.00 GiB" not in str(info.value)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=100))
    with pytest.raises(OutputDirError, match=r"has 100 B free, .* needs about 1\.50 KiB"):
        probe_output(tmp_path / "out", required_bytes=1536)
