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
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from common.dist import DistContext
from configs import ConfigError
from tests.trainer.test_trainer import CLASSES, TensorLoader, dataset, make_cfg, make_trainer
from trainer.checkpoint import CheckpointError, DamagedCheckpointError, UnusableCheckpointError
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


# ------------------------------------------------------- resuming: what is chosen, and why
def _saved_twice(out: Path) -> tuple[Path, Path]:
    """Steps 1 and 2 of one run (1 rank)."""
    _trainer(out, "train.max_steps=2", "checkpoint.every_steps=1").fit()
    return out / "checkpoints" / "step-00000001", out / "checkpoints" / "step-00000002"


def test_resume_none_starts_afresh_beside_the_existing_checkpoints(tmp_path: Path) -> None:
    first, second = _saved_twice(tmp_path)
    saved_lineage = json.loads((second / "meta.json").read_text())["lineage"]
    t = _trainer(tmp_path, "checkpoint.resume=none")
    assert t.maybe_resume() is None and t.step == 0
    assert t.checkpointer.lineage != saved_lineage and t.checkpointer.parent is None
    assert first.is_dir() and second.is_dir()


def test_a_named_incomplete_checkpoint_is_refused_naming_the_option(tmp_path: Path) -> None:
    _, second = _saved_twice(tmp_path)
    (second / "meta.json").unlink()
    t = _trainer(tmp_path / "other", f"checkpoint.resume={second}")
    with pytest.raises(ConfigError, match=r"checkpoint\.resume: .* is not a complete checkpoint"):
        t.maybe_resume()
    assert t.step == 0


def _break_checksum(checkpoint: Path, name: str) -> None:
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["sha256"][name] = "0" * 64
    (checkpoint / "meta.json").write_text(json.dumps(meta))


def test_auto_stops_naming_every_checkpoint_when_none_can_be_resumed(tmp_path: Path) -> None:
    """Every checkpoint damaged: the run stops (it must not start afresh over them),
    naming each one's reason."""
    first, second = _saved_twice(tmp_path)
    _break_checksum(first, "trainer.pt")
    _break_checksum(second, "head-00000.pt")
    t = _trainer(tmp_path)
    with pytest.raises(UnusableCheckpointError, match="can be resumed") as info:
        t.maybe_resume()
    message = str(info.value)
    assert f"{first / 'trainer.pt'} fails its checksum" in message, message
    assert f"{second / 'head-00000.pt'} fails its checksum" in message, message
    assert "checkpoint.resume=none" in message and t.step == 0


def test_auto_names_only_the_incomplete_checkpoints_newer_than_the_one_it_resumes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = _saved_twice(tmp_path)
    meta = json.loads((first / "meta.json").read_text())
    del meta["files"]  # step 1 is incomplete, but older than the step 2 resumed
    (first / "meta.json").write_text(json.dumps(meta))
    t = _trainer(tmp_path)
    with caplog.at_level("WARNING", logger="trainer"):
        assert t.maybe_resume() == second and t.step == 2
    assert "skipping" not in caplog.text, caplog.text


def _shared_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "trainer.pt", weights_only=True)


@pytest.mark.parametrize("config", ["{not json", "[1, 2]", 7])
def test_a_saved_config_that_cannot_be_read_is_refused(tmp_path: Path, config: object) -> None:
    """Without the saved configuration nothing could be compared, so the checkpoint is
    unusable (the checksum is right: only the reader's rules refuse it)."""
    _, second = _saved_twice(tmp_path)
    shared = _shared_state(second)
    shared["config"] = config
    _rewrite(second, "trainer.pt", shared)
    t = _trainer(tmp_path / "other", f"checkpoint.resume={second}")
    with pytest.raises(UnusableCheckpointError, match="config that is not a JSON object"):
        t.maybe_resume()
    assert t.step == 0


def test_a_refused_fact_is_named_once(tmp_path: Path) -> None:
    """data.num_classes is a recorded fact (the head's rows) and a config field: when
    both differ, its refusal is one line, the fact's."""
    _, second = _saved_twice(tmp_path)
    meta = json.loads((second / "meta.json").read_text())
    meta["num_classes"] = CLASSES + 1  # the fact differs from this run's head ...
    (second / "meta.json").write_text(json.dumps(meta))
    t = _trainer(tmp_path, f"data.num_classes={CLASSES + 1}")  # ... and so does the config
    with pytest.raises(ConfigError) as info:
        t.maybe_resume()
    lines = [x for x in str(info.value).splitlines() if "data.num_classes" in x]
    assert len(lines) == 1 and "but the checkpoint has" in lines[0], str(info.value)


def test_a_checkpoint_from_before_the_trackers_were_saved_resumes(tmp_path: Path) -> None:
    """The trackers' run ids are optional state: without them the resume keeps the
    current ones; every required part missing is refused."""
    _, second = _saved_twice(tmp_path)
    shared = _shared_state(second)
    del shared["tracking"]
    _rewrite(second, "trainer.pt", shared)
    t = _trainer(tmp_path)
    t.tracking_runs["mlflow"] = "run-7"
    assert t.maybe_resume() == second and t.step == 2
    assert t.tracking_runs == {"mlflow": "run-7"}
    del shared["history"]
    _rewrite(second, "trainer.pt", shared)
    with pytest.raises(CheckpointError, match=r"trainer\.pt lacks history"):
        _trainer(tmp_path).maybe_resume()


# ------------------------------------------------------------ reading a damaged checkpoint
@pytest.mark.parametrize("sums", [None, ["trainer.pt"], "sha"])
def test_checksums_that_are_not_a_mapping_fail_verify(tmp_path: Path, sums: object) -> None:
    _, second = _saved_twice(tmp_path)
    meta = json.loads((second / "meta.json").read_text())
    if sums is None:
        del meta["sha256"]
    else:
        meta["sha256"] = sums
    (second / "meta.json").write_text(json.dumps(meta))
    storage = CheckpointStorage(second.parent)
    with pytest.raises(DamagedCheckpointError, match=r"trainer\.pt has no SHA-256"):
        storage.verify(storage.open(second), ["trainer.pt"])


def test_reading_shards_a_checkpoint_does_not_hold_is_refused(tmp_path: Path) -> None:
    _, second = _saved_twice(tmp_path)
    storage = CheckpointStorage(second.parent)
    with pytest.raises(CheckpointError, match="holds no center shards"):
        storage.load_shard(storage.open(second), "center", 0, CLASSES, 1)


# ---------------------------------------------------------------- writing: faults, durability
@dataclass(frozen=True)
class _RankZeroOfTwo(DistContext):
    """Rank 0 of two, without a process group: the collectives answer as a rank 1 whose
    writes failed with ``peer_error`` would."""

    peer_error: str = ""

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj, (self.peer_error, {}, {})]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj


def test_a_save_failing_on_another_rank_names_that_rank(tmp_path: Path) -> None:
    ctx = _RankZeroOfTwo(rank=0, world_size=2, peer_error="cannot write head-00001.pt: EIO")
    storage = CheckpointStorage(tmp_path, ctx)
    with pytest.raises(CheckpointError, match=r"rank 1: cannot write head-00001\.pt: EIO"):
        storage.save(3, {"x": torch.ones(2)}, {}, {})
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone


class VanishingStorage(CheckpointStorage):
    """The checkpoints directory is emptied under the run (a cleanup job, a file system
    gone away) while ``stage`` is being written, which then fails."""

    stage = "files"

    def _gone(self) -> OSError:
        shutil.rmtree(self.directory)
        return OSError(errno.EIO, "Input/output error", str(self.directory))

    def write_file(self, obj, path: Path) -> str:  # type: ignore[no-untyped-def]
        if self.stage == "files":
            raise self._gone()
        return super().write_file(obj, path)

    def _publish(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.stage == "publish":
            raise self._gone()
        return super()._publish(*args, **kwargs)


@pytest.mark.parametrize("stage", ["files", "publish"])
def test_a_save_whose_directory_vanished_reports_the_write_error(
    tmp_path: Path, stage: str
) -> None:
    """The cleanup of the temporary directory never hides the failure that caused it."""
    storage = VanishingStorage(tmp_path / "checkpoints")
    storage.stage = stage
    with pytest.raises(CheckpointError, match="Input/output error"):
        storage.save(1, {"x": torch.ones(2)}, {}, {})


def test_a_save_is_durable_before_it_is_published_and_leaks_no_descriptor(
    tmp_path: Path, monkeypatch
) -> None:
    """Every file, then the temporary directory, is fsynced before the rename that
    publishes the checkpoint; the checkpoints directory after it. No save leaves a file
    descriptor open."""
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst) -> None:  # type: ignore[no-untyped-def]
        events.append(("rename", str(src)))
        real_rename(src, dst)

    storage = CheckpointStorage(tmp_path / "checkpoints")
    storage.save(1, {"x": torch.ones(2)}, {}, {})  # the directory exists from here on
    descriptors = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    final = storage.save(2, {"x": torch.ones(2)}, {}, {"y": torch.zeros(1)})
    monkeypatch.undo()
    tmp = str(tmp_path / "checkpoints" / ".tmp-step-00000002")
    publish = events.index(("rename", tmp))
    synced_before = {Path(p).name for kind, p in events[:publish] if kind == "fsync"}
    assert synced_before == {p.name for p in final.iterdir()} | {Path(tmp).name}, events
    assert ("fsync", str(tmp_path / "checkpoints")) in events[publish:], events
    for step in (3, 4, 5):
        storage.save(step, {"x": torch.ones(2)}, {}, {})
    assert len(os.listdir("/proc/self/fd")) == descriptors


def test_write_error_passes_a_named_write_error_unchanged(tmp_path: Path) -> None:
    from trainer.checkpoint import files

    named = files.write_error(tmp_path / "a.pt", OSError(errno.EIO, "Input/output error"))
    assert files.write_error(tmp_path / "b.pt", named) is named


# ------------------------------------------------------------------ shard states
def _trained_rows(rows: int = 6, dim: int = 4) -> tuple[torch.nn.Linear, torch.optim.AdamW]:
    """A head-like module of ``rows`` rows with two AdamW steps of state (its ``step`` is
    replicated, its moments are row-indexed)."""
    torch.manual_seed(0)
    module = torch.nn.Linear(dim, rows, bias=False)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    for _ in range(2):
        module(torch.randn(3, dim)).square().sum().backward()
        optimizer.step()
    return module, optimizer


def test_resharding_slices_rows_and_keeps_the_replicated_state() -> None:
    from trainer.checkpoint.resharding import reshard, shard_state

    module, optimizer = _trained_rows()
    full = shard_state(module, optimizer, 0, 6, 1)
    halves = [reshard([full], lo, 3, 1, "full") for lo in (0, 3)]
    part = reshard(halves[::-1], 2, 3, 1, "halves")  # classes 2..4 span both halves
    assert torch.equal(part["model"]["weight"], full["model"]["weight"][2:5])
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(part["optim_state"][key], full["optim_state"][key][2:5])
    assert torch.equal(part["optim_state"]["step"], full["optim_state"]["step"])
    del halves[1]["optim_state"]["exp_avg"]
    with pytest.raises(ValueError, match="halves: shard at row 3 lacks 'exp_avg'"):
        reshard(halves, 0, 6, 1, "halves")


def test_a_sharded_optimizer_holding_more_than_one_parameter_is_refused() -> None:
    from trainer.checkpoint.resharding import shard_state

    module, _ = _trained_rows()
    extra = torch.nn.Parameter(torch.zeros(6, 4))
    two_groups = torch.optim.SGD([{"params": [module.weight]}, {"params": [extra]}], lr=0.1)
    with pytest.raises(ValueError, match="exactly one parameter"):
        shard_state(module, two_groups, 0, 6, 1)
    two_params = torch.optim.SGD([module.weight, extra], lr=0.1, momentum=0.9)
    (module.weight.sum() + extra.sum()).backward()
    two_params.step()  # both parameters now have state
    with pytest.raises(ValueError, match="exactly one parameter"):
        shard_state(module, two_params, 0, 6, 1)


def test_a_sharded_module_has_one_row_per_class_by_default_and_loads_without_optimizer() -> None:
    """A plain head's shard records K = 1; a module without an optimizer (export, eval)
    takes the rows of a trained shard and ignores its optimizer state."""
    from trainer.checkpoint.states import ShardedModule

    module, optimizer = _trained_rows()
    module.class_start, module.num_local = 0, 6
    state = ShardedModule(module, optimizer).state_dict()
    assert state["num_subcenters"] == 1 and state["rows"] == 6
    reader = torch.nn.Linear(4, 6, bias=False)
    reader.class_start, reader.num_local = 0, 6
    ShardedModule(reader, None).load_state_dict(state)
    assert torch.equal(reader.weight, module.weight)


# ------------------------------------------------- the second sample's survivors (session 7)
def test_a_checkpoint_without_its_saved_config_is_refused_naming_it(tmp_path: Path) -> None:
    _, second = _saved_twice(tmp_path)
    shared = _shared_state(second)
    del shared["config"]
    _rewrite(second, "trainer.pt", shared)
    with pytest.raises(CheckpointError, match=r"trainer\.pt lacks config"):
        _trainer(tmp_path / "other", f"checkpoint.resume={second}").maybe_resume()


def test_loading_an_incomplete_checkpoint_directly_is_refused(tmp_path: Path) -> None:
    """``load`` is public (tools read checkpoints with it): it refuses an incomplete
    checkpoint itself instead of trusting the caller to have scanned it."""
    _, second = _saved_twice(tmp_path)
    (second / "rank-00000.pt").unlink()
    t = _trainer(tmp_path / "other")
    with pytest.raises(CheckpointError, match=r"rank-00000\.pt is missing"):
        t.checkpointer.load(second)
    assert t.step == 0


def test_the_histories_centres_and_last_lrs_are_restored(tmp_path: Path) -> None:
    """Every replicated and sharded part comes back: the verification history, the
    learnable centres (their own shards), and each scheduler's last LR equals its
    optimizer's."""
    from tests.trainer.test_trainer_aux import make_aux_trainer

    x, y = dataset()

    def aux(*extra: str):
        return make_aux_trainer(make_cfg(tmp_path, *extra), TensorLoader(x, y, 8, 0, 1))

    saved = aux("aux.center_weight=0.1", "optimizer.lr=0.2")
    for i in range(3):
        saved.train_step([(x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8])])
    saved.history.append({"step": 3, "results": {"lfw": 0.75}})
    ckpt = saved.save_checkpoint()
    resumed = aux("aux.center_weight=0.1", "optimizer.lr=0.1")  # a changed peak LR
    assert not torch.equal(resumed.center.centers, saved.center.centers)
    assert resumed.maybe_resume() == ckpt and resumed.step == 3
    assert resumed.history == [{"step": 3, "results": {"lfw": 0.75}}]
    assert torch.equal(resumed.center.centers.detach(), saved.center.centers.detach())
    for scheduler in resumed.schedulers:
        groups = scheduler.optimizer.param_groups
        assert scheduler.get_last_lr() == [g["lr"] for g in groups]
    assert resumed.schedulers[0].get_last_lr() != saved.schedulers[0].get_last_lr()


def test_a_file_that_cannot_be_read_fails_verify_naming_it(tmp_path: Path, monkeypatch) -> None:
    _, second = _saved_twice(tmp_path)
    storage = CheckpointStorage(second.parent)

    def unreadable(path: Path) -> str:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(storage, "digest", unreadable)
    with pytest.raises(DamagedCheckpointError, match=r"trainer\.pt cannot be read: .*denied"):
        storage.verify(storage.open(second), ["trainer.pt"])


def test_leftovers_are_removed_only_where_this_class_made_them(tmp_path: Path) -> None:
    """``.tmp-step-*`` and ``.trash-*`` directories are removed and listed; a file or a
    symbolic link of such a name (not ours) stays, and so does what a link points to."""
    directory = tmp_path / "checkpoints"
    ours = [directory / ".tmp-step-00000003", directory / ".trash-step-00000001-77"]
    for d in ours:
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "head-00000.pt").write_bytes(b"x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("user data")
    link = directory / ".tmp-step-00000004"
    link.symlink_to(elsewhere, target_is_directory=True)
    plain = directory / ".trash-notes"
    plain.write_text("a file of that name")
    removed = CheckpointStorage(directory).remove_leftovers()
    assert sorted(removed) == sorted(ours)
    assert not any(d.exists() for d in ours)
    assert link.is_symlink() and (elsewhere / "keep.txt").read_text() == "user data"
    assert plain.read_text() == "a file of that name"


def test_a_checkpoints_step_is_its_names_else_its_meta_jsons() -> None:
    named = CheckpointDir(Path("run/checkpoints/step-00000012"), {"step": 99}, None)
    assert named.step == 12
    assert CheckpointDir(Path("best"), {"step": 7}, None).step == 7
    assert CheckpointDir(Path("best"), {}, None).step == -1  # before any step


def test_write_errors_name_the_os_error_in_the_chain(tmp_path: Path, monkeypatch) -> None:
    """The cause named is the ``OSError``'s: its errno's text, its own text when it has
    no errno (found also as the cause of torch's ``RuntimeError``); with free space, a
    writer error without one is named as raised."""
    from trainer.checkpoint import files

    monkeypatch.setattr(files, "_free_bytes", lambda path: 1 << 40)
    target = tmp_path / "rank-00001.pt"
    error = files.write_error(target, OSError(errno.EIO, "Input/output error"))
    assert error.errno == errno.EIO
    assert str(error) == f"cannot write {target}: Input/output error"
    without_errno = OSError("the file system went away")
    assert str(files.write_error(target, without_errno)).endswith(": the file system went away")
    wrapped = RuntimeError("[enforce fail at inline_container.cc:595] unexpected pos")
    wrapped.__context__ = OSError(errno.EROFS, "Read-only file system")
    assert files.write_error(target, wrapped).errno == errno.EROFS

    def writer_fails() -> None:
        raise RuntimeError("unexpected pos 64")

    assert files.attempt(writer_fails) == "unexpected pos 64"


def test_a_nan_option_equals_itself_in_the_config_comparison() -> None:
    """A float option saved as NaN and still NaN is no change (NaN != NaN in Python)."""
    from trainer.checkpoint.policy import compare_configs

    nan = float("nan")
    assert compare_configs({"train": {"seed": nan}}, {"train": {"seed": nan}}) == ([], [])
    _, refused = compare_configs({"train": {"seed": nan}}, {"train": {"seed": 0.5}})
    assert [key for key, *_ in refused] == ["train.seed"]
