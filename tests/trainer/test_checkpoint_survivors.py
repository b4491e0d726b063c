"""trainer.checkpoint: tests written against mutation survivors (issue 26).

* checkpoint files are read with ``weights_only``: a file holding a pickled object is
  refused, and the object's code never runs, even when its checksum is right;
* a ``meta.json`` that does not list its files makes the checkpoint incomplete: ``auto``
  skips it, saying why, also when it is the only one;
* ``auto``'s order: the newest lineage newest step first, then the other lineages, most
  recently written first;
* shards of another sub-centre count are refused when read.
"""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import pytest
import torch

from tests.trainer.test_trainer import CLASSES, TensorLoader, dataset, make_cfg, make_trainer
from trainer.checkpoint import CheckpointError
from trainer.checkpoint.storage import CheckpointDir, CheckpointStorage, resume_order

pytestmark = pytest.mark.usefixtures("one_thread")


class _Payload:
    """Unpickling it creates ``marker``: proof that a checkpoint file ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _trainer(out: Path, *extra: str):
    x, y = dataset()
    return make_trainer(make_cfg(out, *extra), TensorLoader(x, y, 8, 0, 1))


def _rewrite(checkpoint: Path, name: str, obj: object) -> None:
    """Replace ``name`` with ``torch.save(obj)`` and record its real size and SHA-256 in
    ``meta.json``, so that only the reader's own rules can refuse it."""
    torch.save(obj, checkpoint / name)
    data = (checkpoint / name).read_bytes()
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["files"][name] = len(data)
    meta["sha256"][name] = hashlib.sha256(data).hexdigest()
    (checkpoint / "meta.json").write_text(json.dumps(meta))


def test_a_checkpoint_file_holding_a_pickled_object_is_not_loaded(tmp_path: Path) -> None:
    _trainer(tmp_path, "train.max_steps=2", "checkpoint.every_steps=2").fit()
    checkpoint = tmp_path / "checkpoints" / "step-00000002"
    marker = tmp_path / "code-ran"
    _rewrite(checkpoint, "rank-00000.pt", {"rng": _Payload(marker)})
    t = _trainer(tmp_path / "other", f"checkpoint.resume={checkpoint}")
    with pytest.raises(Exception, match="holding objects other than tensors"):
        t.maybe_resume()
    assert not marker.exists() and t.step == 0


def test_a_meta_json_without_its_file_list_is_incomplete(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _trainer(tmp_path, "train.max_steps=2", "checkpoint.every_steps=1").fit()
    newest = tmp_path / "checkpoints" / "step-00000002"
    meta = json.loads((newest / "meta.json").read_text())
    del meta["files"]
    (newest / "meta.json").write_text(json.dumps(meta))
    t = _trainer(tmp_path, "train.max_steps=2", "checkpoint.every_steps=1")
    with caplog.at_level("WARNING", logger="trainer"):
        assert t.maybe_resume().name == "step-00000001" and t.step == 1
    assert "does not list its files" in caplog.text


def test_a_lone_incomplete_checkpoint_is_named_when_auto_finds_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _trainer(tmp_path, "train.max_steps=1", "checkpoint.every_steps=1").fit()
    only = tmp_path / "checkpoints" / "step-00000001"
    (only / "meta.json").unlink()
    t = _trainer(tmp_path, "train.max_steps=1", "checkpoint.every_steps=1")
    with caplog.at_level("WARNING", logger="trainer"):
        assert t.maybe_resume() is None and t.step == 0
    assert "skipping" in caplog.text and "step-00000001" in caplog.text


def test_auto_tries_the_newest_lineage_then_the_others_most_recent_first() -> None:
    def ckpt(step: int, lineage: str, written: float) -> CheckpointDir:
        meta = {"step": step, "lineage": lineage, "time": written}
        return CheckpointDir(Path(f"/c/step-{step:08d}"), meta)

    dirs = [ckpt(4, "old", 10.0), ckpt(9, "older", 5.0), ckpt(2, "new", 30.0),
            ckpt(3, "new", 20.0), ckpt(6, "old", 15.0)]  # fmt: skip
    dirs.append(CheckpointDir(Path("/c/step-00000099"), {"time": 99.0}, "no meta.json"))
    order = [(d.lineage, d.step) for d in resume_order(dirs)]
    assert order == [("new", 3), ("new", 2), ("old", 6), ("old", 4), ("older", 9)]


def test_shards_of_another_sub_centre_count_are_refused(tmp_path: Path) -> None:
    t = _trainer(tmp_path, "train.max_steps=1", "checkpoint.every_steps=1")
    t.fit()
    storage = t.checkpointer.storage
    checkpoint = storage.open(tmp_path / "checkpoints" / "step-00000001")
    assert storage.load_shard(checkpoint, "head", 0, CLASSES, 1)
    with pytest.raises(ValueError, match="has 1 sub-centres per class, the head has 3"):
        storage.load_shard(checkpoint, "head", 0, CLASSES, 3)


class FailingPublishStorage(CheckpointStorage):
    """Storage whose publish step (``meta.json`` and the rename) fails while ``fail`` is set:
    every rank's files are written, then the disk refuses the last write."""

    fail = False

    def _publish(self, step, tmp, final, ranges, checksums, extra):  # type: ignore[no-untyped-def]
        if self.fail:
            (tmp / "meta.json").write_text("{")  # half-written, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "meta.json"))
        return super()._publish(step, tmp, final, ranges, checksums, extra)


def test_a_failed_publish_leaves_no_temporary_directory(tmp_path: Path) -> None:
    """The publish step failing is reported naming the cause, its ``.tmp-step-*``
    directory is removed at once (not left for the next save), and the previous
    checkpoint stays the latest."""
    x, y = dataset()
    t = make_trainer(make_cfg(tmp_path), TensorLoader(x, y, 8, 0, 1), storage=FailingPublishStorage)
    t.train_step([(x[:8], y[:8])])
    good = t.save_checkpoint()
    t.train_step([(x[8:16], y[8:16])])
    t.checkpointer.storage.fail = True
    with pytest.raises(CheckpointError, match="No space left on device"):
        t.save_checkpoint()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [good.name]
    assert t.checkpointer.latest() == good


def test_a_full_disk_is_named_with_the_space_left(tmp_path: Path, monkeypatch) -> None:
    """ENOSPC names the cause and the free space there; torch's writer error without an
    errno on a nearly full disk is taken for ENOSPC; with space, it is named as raised."""
    from trainer.checkpoint import files

    monkeypatch.setattr(files, "_free_bytes", lambda path: 3 << 20)
    error = files.write_error(tmp_path / "x.pt", OSError(errno.ENOSPC, "no space"))
    assert error.errno == errno.ENOSPC
    assert "No space left on device (3.00 MiB free there)" in str(error), str(error)
    error = files.write_error(tmp_path / "x.pt", RuntimeError("unexpected pos 128"))
    assert error.errno == errno.ENOSPC and "(3.00 MiB free there)" in str(error)
    monkeypatch.setattr(files, "_free_bytes", lambda path: 1 << 40)
    error = files.write_error(tmp_path / "x.pt", RuntimeError("unexpected pos 128"))
    assert error.errno is None and "RuntimeError: unexpected pos 128" in str(error)


def test_attempt_reports_a_failed_write_as_one_line_naming_the_file(
    tmp_path: Path, monkeypatch
) -> None:
    from trainer.checkpoint import files

    monkeypatch.setattr(files, "_free_bytes", lambda path: 3 << 20)
    target = tmp_path / "head-00000.pt"

    def full(path: Path) -> None:
        raise OSError(errno.ENOSPC, "disk quota", str(path))

    line = files.attempt(full, target)
    assert line is not None and str(target) in line
    assert "No space left on device (3.00 MiB free there)" in line, line
    assert files.attempt(lambda: None) is None


def test_the_grad_scalers_state_round_trips() -> None:
    from trainer.checkpoint.states import ScalerState

    saved = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=7)
    restored = torch.amp.GradScaler("cpu")
    state = ScalerState(saved).state_dict()
    assert state["scale"] == 256.0 and state["growth_interval"] == 7
    ScalerState(restored).load_state_dict(state)
    assert restored.get_scale() == 256.0 and restored.get_growth_interval() == 7
    ScalerState(restored).load_state_dict({})  # a disabled scaler's empty state: no change
    assert restored.get_scale() == 256.0


@pytest.mark.parametrize("text", ["[1, 2]", '"step"', "null"])
def test_a_meta_json_that_is_not_an_object_is_refused(tmp_path: Path, text: str) -> None:
    (tmp_path / "meta.json").write_text(text)
    with pytest.raises(ValueError, match="not an object"):
        CheckpointStorage(tmp_path.parent).read_meta(tmp_path)
