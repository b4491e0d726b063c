"""Faults survived and bad input refused, in process (the torchrun-level faults are in
``tests/trainer/test_faults_torchrun.py``): non-finite steps, a hung peer, a full or unwritable
output directory, checkpoints that are not ours, embedding-size mismatches."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import train_dist
from common.digest import sha256_file
from common.dist import init_distributed
from configs import ConfigError, load_config
from tests.distributed import run_ranks
from tests.trainer.test_trainer import (
    CLASSES,
    TensorLoader,
    dataset,
    gather_state,
    make_cfg,
    make_trainer,
)
from trainer.build import check_embedding_size
from trainer.checkpoint import CheckpointError, CheckpointStorage
from trainer.loop import TrainingError
from trainer.preflight import OutputDirError, probe_output

pytestmark = pytest.mark.usefixtures("one_thread")


class KeyedLoader(TensorLoader):
    """TensorLoader that exposes ``last_keys`` and poisons chosen samples or batches
    with NaN (``poison_keys``: sample indices; ``poison_from``: every batch from this
    batch number of the iteration on)."""

    def __init__(self, *args: Any, poison_keys: tuple[int, ...] = (), poison_from: int = -1):
        super().__init__(*args)
        self.poison_keys = set(poison_keys)
        self.poison_from = poison_from
        self.last_keys: list[int] | None = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._done = 0
        order = [i for i, _ in self.sampler]
        for j in range(0, len(order), self.batch):
            keys = order[j : j + self.batch]
            x = self.x[torch.tensor(keys)].clone()
            for row, key in enumerate(keys):
                if key in self.poison_keys:
                    x[row] = float("nan")
            if 0 <= self.poison_from <= self._done:
                x[:] = float("inf")
            self._done += 1
            self.last_keys = keys
            yield x, self.y[torch.tensor(keys)]
        self.sampler.consumed = self.sampler.num_samples


def _watch_steps(t: Any) -> list[tuple[int, bool, bool]]:
    """Record ``(step, skipped, parameters changed)`` for every train_step of ``t``."""
    seen: list[tuple[int, bool, bool]] = []
    real = t.train_step

    def step(micro):
        before = [p.detach().clone() for p in t.stepper.params()]
        result = real(micro)
        changed = any(
            not torch.equal(a, p) for a, p in zip(before, t.stepper.params(), strict=True)
        )
        seen.append((t.step, bool(result.skipped), changed))
        return result

    t.train_step = step
    return seen


def _nan_on_one_rank(rank: int, world: int, out: str) -> dict:
    x, y = dataset()
    cfg = make_cfg(out, "data.batch_size=8", "train.max_steps=4", "checkpoint.every_steps=2")
    probe = TensorLoader(x, y, 8, 1, world)  # rank 1's first batch, to pick a poisoned key
    probe.set_epoch(0)
    bad_key = next(iter(probe.sampler))[0]
    t = make_trainer(cfg, KeyedLoader(x, y, 8, rank, world, poison_keys=(bad_key,)))
    seen = _watch_steps(t)
    t.fit()
    state = gather_state(t)
    return {
        "seen": seen,
        "bad_key": bad_key,
        "finite": all(torch.isfinite(v).all() for v in state.values()),
        "streak": t.bad_streak,
    }


def test_nonfinite_step_skipped_on_every_rank_and_logged(tmp_path: Path) -> None:
    """A NaN sample on rank 1 makes the global loss NaN: both ranks skip the step (no
    parameter changes), later steps train normally, the keys land in bad_steps.jsonl."""
    results = run_ranks(_nan_on_one_rank, 2, str(tmp_path))
    for r in results:
        assert r["seen"][0] == (1, True, False)  # step 1 skipped: nothing moved
        assert all(skipped is False and changed for _, skipped, changed in r["seen"][1:])
        assert r["finite"] and r["streak"] == 0
    records = [json.loads(line) for line in (tmp_path / "bad_steps.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == [1]
    assert results[0]["bad_key"] in records[0]["keys"][1][0]  # rank 1, micro-batch 0
    assert records[0]["loss"] == "nan"


def test_consecutive_bad_steps_stop_with_last_good_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    x, y = dataset()
    cfg = make_cfg(tmp_path, "train.max_bad_steps=3", "checkpoint.every_steps=2")
    t = make_trainer(cfg, KeyedLoader(x, y, 8, 0, 1, poison_from=5))  # steps 6, 7, 8 bad
    with pytest.raises(TrainingError) as info, caplog.at_level("WARNING", logger="trainer"):
        t.fit()
    message = str(info.value)
    assert "step 8" in message and "train.max_bad_steps=3" in message
    assert "step-00000004" in message  # step 6 fell in the streak: not saved
    assert "sample keys by rank" in caplog.text
    good = t.checkpointer.latest()
    assert good is not None and good.name == "step-00000004"
    fresh = make_trainer(make_cfg(tmp_path), TensorLoader(x, y, 8, 0, 1))
    assert fresh.maybe_resume() == good and fresh.step == 4
    assert all(torch.isfinite(p).all() for p in fresh.stepper.params())


def test_skipped_steps_are_logged_as_skipped_not_as_zero_loss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Log windows of 2 steps over steps 1-3 good, 4-6 bad: the second line averages
    its good step and counts the skipped one; the third, all skipped, says so instead
    of ``loss 0.0000 acc 0.0000``."""
    x, y = dataset()
    cfg = make_cfg(tmp_path, "train.max_steps=6", "log.every_steps=2", "train.max_bad_steps=5")
    t = make_trainer(cfg, KeyedLoader(x, y, 8, 0, 1, poison_from=3))
    # (a run that ends in a bad streak fails: nothing saved or exported)
    with caplog.at_level("INFO", logger="trainer"), pytest.raises(TrainingError, match="ended"):
        t.fit()
    lines = {
        int(m.group(1)): m.group(2) for m in re.finditer(r"step (\d)/\d+ epoch 0 (.*)", caplog.text)
    }
    assert re.match(r"loss \d+\.\d{4} acc \d\.\d{4} lr ", lines[2]), lines[2]
    assert re.match(r"loss \d+\.\d{4} acc \d\.\d{4} \(1 skipped\) lr ", lines[4]), lines[4]
    assert lines[6].startswith("all 2 steps since the last log skipped"), lines[6]
    assert len(lines) == 3 and not any("0.0000" in line or "nan" in line for line in lines.values())
    assert t.bad_streak == 3


def _hung_peer(rank: int, world: int, out: str) -> str:
    x, y = dataset()
    cfg = make_cfg(out, "data.batch_size=8", "train.collective_timeout_s=3")
    t = make_trainer(cfg, TensorLoader(x, y, 8, rank, world))
    if rank == 1:
        time.sleep(8)  # hung outside any collective; rank 0 waits in step 1's
        return "slept"
    try:
        t.fit()
    except TrainingError as exc:
        return str(exc)
    return "no error"


def test_hung_peer_fails_after_timeout_naming_the_step(tmp_path: Path) -> None:
    started = time.monotonic()
    message, slept = run_ranks(_hung_peer, 2, str(tmp_path), pg_timeout=3.0, timeout=120)
    assert slept == "slept"
    # the first collective of the run is the trackers' start-up, before step 1
    assert re.match(r"(step 1|start-up \(before step 1\)): a collective timed out", message), (
        message
    )
    assert "train.collective_timeout_s=3" in message
    assert time.monotonic() - started < 90


def test_collective_timeout_reaches_init_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(
        torch.distributed, "init_process_group", lambda backend, **kw: seen.update(kw)
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    init_distributed(timeout_s=42.5)
    assert seen["timeout"].total_seconds() == 42.5


# ----------------------------------------------------------------- output directory
def test_unwritable_output_fails_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OutputDirError, match="a_file/run"):
        probe_output(blocker / "run")
    code = train_dist.main(["configs/demo", f"train.output={blocker}/run"])
    assert code == 1
    assert f"train.output='{blocker}/run'" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere: permissions cannot be tested as root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(OutputDirError, match="not writable"):
            probe_output(locked)


def test_too_little_free_space_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10 * 2**20))
    with pytest.raises(OutputDirError, match=r"10\.00 MiB free.*needs about 1\.00 GiB") as info:
        probe_output(tmp_path / "out", required_bytes=2**30)
    assert str(tmp_path / "out") in str(info.value)
    probe_output(tmp_path / "out", required_bytes=2**20)  # enough: passes


class FillingStorage(CheckpointStorage):
    """Storage on a disk that fills up half-way through the second file it writes
    while ``full`` is set."""

    full = False
    written = 0

    def write_file(self, obj: Any, path: Path) -> str:
        if self.full:
            self.written += 1
            if self.written == 2:
                path.write_bytes(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
        return super().write_file(obj, path)


def test_disk_full_during_save_names_path_and_keeps_previous(tmp_path: Path) -> None:
    x, y = dataset()
    t = make_trainer(make_cfg(tmp_path), TensorLoader(x, y, 8, 0, 1), storage=FillingStorage)
    t.train_step([(x[:8], y[:8])])
    good = t.save_checkpoint()
    t.train_step([(x[8:16], y[8:16])])
    t.checkpointer.storage.full = True
    with pytest.raises(CheckpointError) as info:
        t.save_checkpoint()
    message = str(info.value)
    assert "No space left on device" in message and "rank-00000.pt" in message
    assert ".tmp-step-00000002" in message and str(good) in message
    t.checkpointer.storage.full = False
    assert not (tmp_path / "checkpoints" / ".tmp-step-00000002").exists()  # cleaned up
    assert t.checkpointer.latest() == good
    fresh = make_trainer(make_cfg(tmp_path), TensorLoader(x, y, 8, 0, 1))
    assert fresh.maybe_resume() == good and fresh.step == 1


# ------------------------------------------------------------------ bad checkpoints
class _Boom:
    def __reduce__(self):  # would create a file if unpickled
        return (os.system, ("touch pwned",))


def _forge(ckpt: Path, name: str, data: bytes) -> None:
    """Replace ``name`` in ``ckpt`` and record its new size, so the directory looks
    complete: only the file's content is wrong."""
    (ckpt / name).write_bytes(data)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"][name] = len(data)
    meta["sha256"][name] = sha256_file(ckpt / name)  # checksum too
    (ckpt / "meta.json").write_text(json.dumps(meta))


def test_foreign_or_truncated_checkpoint_files_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    x, y = dataset()
    t = make_trainer(make_cfg(tmp_path / "run"), TensorLoader(x, y, 8, 0, 1))
    t.train_step([(x[:8], y[:8])])
    ckpt = t.save_checkpoint()
    cfg = make_cfg(tmp_path / "other", f"checkpoint.resume={ckpt}")

    _forge(ckpt, "trainer.pt", pickle.dumps({"backbone": _Boom()}, protocol=2))
    with pytest.raises(CheckpointError, match=r"trainer\.pt is not a readable checkpoint"):
        make_trainer(cfg, TensorLoader(x, y, 8, 0, 1)).maybe_resume()
    assert not (tmp_path / "pwned").exists()  # nothing was executed

    good_head = (ckpt / "head-00000.pt").read_bytes()
    _forge(ckpt, "head-00000.pt", good_head[: len(good_head) // 2])  # truncated
    with pytest.raises(CheckpointError, match=r"head-00000\.pt"):
        storage = CheckpointStorage(ckpt.parent)
        storage.load_head_shard(storage.open(ckpt), 0, CLASSES, 1)
    # a truncation that meta.json does not know about: the directory is not complete
    (ckpt / "head-00000.pt").write_bytes(good_head[:100])
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        make_trainer(cfg, TensorLoader(x, y, 8, 0, 1)).maybe_resume()


# --------------------------------------------------------------- embedding size
def test_embedding_size_mismatch_is_named() -> None:
    cfg = load_config("demo", ["model.embedding_size=128"])
    with pytest.raises(ConfigError, match=r"shape \(7,\).*model\.embedding_size=128"):
        check_embedding_size(nn.Sequential(nn.Flatten(), nn.LazyLinear(7)), cfg)
    check_embedding_size(nn.Sequential(nn.Flatten(), nn.LazyLinear(128)), cfg)


def test_checkpoint_with_other_embedding_size_is_refused(tmp_path: Path) -> None:
    x, y = dataset()
    t = make_trainer(make_cfg(tmp_path), TensorLoader(x, y, 8, 0, 1))
    ckpt = t.save_checkpoint()
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["embedding_size"] = 4
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"model\.embedding_size=8 .* size 4"):
        t.checkpointer.load(ckpt)


def test_batch_too_large_for_one_step_is_named(tmp_path: Path) -> None:
    """The config speaks in per-rank batches, so no world size can fail to divide a
    global batch; a batch too large for a single step per epoch is refused instead."""
    x, y = dataset()
    cfg = make_cfg(tmp_path, "data.batch_size=64", "train.grad_accum=2")
    with pytest.raises(ConfigError, match=r"data\.batch_size=64 x train\.grad_accum=2"):
        make_trainer(cfg, TensorLoader(x, y, 64, 0, 1))


def test_face_loader_reports_record_keys(tmp_path: Path) -> None:
    """``FaceLoader.last_keys`` are the RecordIO keys of the batch just yielded."""
    from datasets import recordio
    from datasets.discovery import open_dataset
    from datasets.loader import FaceLoader
    from datasets.synthetic import SyntheticConfig, generate

    generate(tmp_path, SyntheticConfig(3, 4, 2, 1, seed=2), workers=0)
    ds = open_dataset(tmp_path)
    loader = FaceLoader(ds, batch_size=4, rank=0, world_size=1, seed=1, num_workers=0)
    loader.set_epoch(0)
    reader = recordio.IndexedRecordIO(tmp_path / "train.idx", tmp_path / "train.rec", "r")
    seen = []
    for _, labels in loader:
        keys = loader.last_keys.tolist()
        assert set(keys) <= {int(k) for k in ds.image_keys}
        header_labels = [int(recordio.unpack(reader.read_idx(k))[0].label) for k in keys]
        assert header_labels == labels.tolist()
        seen += keys
    assert len(set(seen)) == len(seen) == len(ds)  # one epoch, every record once
