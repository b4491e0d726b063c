"""Resuming safely (issue 20, items 1-4, 10, 15): the configuration check before any
state is loaded, checkpoint lineages, checksums, finite-only checkpoints and exports,
and the warning when ``auto`` skips an incomplete newest checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from configs import Config, ConfigError, config_to_dict
from configs.resume_policy import resume_policies
from tests.distributed import run_ranks
from tests.trainer.test_trainer import (
    TensorLoader,
    dataset,
    make_cfg,
    make_trainer,
)
from trainer.checkpoint import DamagedCheckpointError, compare_configs
from trainer.loop import Trainer, TrainingError

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(out: Path, *extra: str, world: int = 1, rank: int = 0) -> Trainer:
    x, y = dataset()
    batch = 8 // world
    return make_trainer(
        make_cfg(out, f"data.batch_size={batch}", *extra), TensorLoader(x, y, batch, rank, world)
    )


def _names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step-*"))


# ------------------------------------------------------- item 1: changed options
def test_changed_hyperparameters_are_applied_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """lr, momentum and weight decay given on resume are the ones the optimizers use
    (backbone and head), the LR is the new peak times the schedule at the resumed
    step, and the change is logged; the checkpoint's config part records them."""
    _trainer(tmp_path, "train.max_steps=3").fit()
    new = ("optimizer.lr=0.01", "optimizer.momentum=0.5", "optimizer.weight_decay=0")
    t = _trainer(tmp_path, *new)
    with caplog.at_level("WARNING", logger="trainer"):
        assert t.maybe_resume() is not None and t.step == 3
    assert "optimizer.lr: 0.1 -> 0.01" in caplog.text
    assert "optimizer.momentum: 0.9 -> 0.5" in caplog.text
    assert "optimizer.weight_decay: 0.0005 -> 0.0" in caplog.text
    expected_lr = 0.01 * t.schedule(3)
    for optimizer in (t.opt_backbone, t.opt_head):
        group = optimizer.param_groups[0]
        assert (group["momentum"], group["weight_decay"]) == (0.5, 0.0), type(optimizer)
        assert group["initial_lr"] == 0.01
        assert group["lr"] == pytest.approx(expected_lr)
    assert t.schedulers[0].base_lrs == [0.01]
    t.fit()
    saved = torch.load(t.checkpointer.latest() / "trainer.pt", weights_only=True)["config"]
    assert json.loads(saved)["optimizer"]["momentum"] == 0.5


def test_unchanged_resume_keeps_the_saved_lr_exactly(tmp_path: Path) -> None:
    """Recomputing the resumed LR from this run's peak and rule gives the saved value
    bit for bit when nothing changed."""
    first = _trainer(tmp_path, "train.max_steps=4")
    first.fit()
    lrs = [o.param_groups[0]["lr"] for o in first.stepper.optimizers()]
    t = _trainer(tmp_path)
    t.maybe_resume()
    assert [o.param_groups[0]["lr"] for o in t.stepper.optimizers()] == lrs


# -------------------------------------------- items 1 and 10: refused differences
def test_incompatible_options_are_refused_naming_each_before_loading(tmp_path: Path) -> None:
    _trainer(tmp_path, "train.max_steps=2").fit()
    t = _trainer(
        tmp_path,
        "head.loss=cosface",
        "head.margin=0.35",
        "optimizer.name=adamw",
        "head.num_subcenters=3",
        "train.seed=9",
        "data.num_images=7",
        "model.network=r100",
        "optimizer.lr=0.01",  # allowed: not named
    )
    before = [p.detach().clone() for p in t.stepper.params()]
    with pytest.raises(ConfigError) as info:
        t.maybe_resume()
    message = str(info.value)
    for option, old, new in (
        ("head.loss", "'arcface'", "'cosface'"),
        ("head.margin", "0.3", "0.35"),
        ("optimizer.name", "'sgd'", "'adamw'"),
        ("head.num_subcenters", "1", "3"),
        ("train.seed", "0", "9"),
        ("data.num_images", None, "7"),
        ("model.network", None, "'r100'"),
    ):
        line = next((x for x in message.splitlines() if x.strip().startswith(option)), "")
        assert line, (option, message)
        assert f"now {new}" in line and (old is None or f"checkpoint {old}" in line), line
    assert "optimizer.lr" not in message
    assert "train.output=" in message and "checkpoint.resume=none" in message
    # nothing was loaded
    assert t.step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, t.stepper.params(), strict=True))


def test_policy_lists_what_may_change() -> None:
    base = config_to_dict(make_cfg("/tmp/x"))
    allowed = {
        "optimizer": {"lr": 0.01, "momentum": 0.5, "weight_decay": 0.0, "head_state_dtype": "bf16"},
        "scheduler": {"power": 1.0, "warmup_epochs": 1.0},
        "train": {"epochs": 9, "max_steps": 3, "output": "/elsewhere"},
        "checkpoint": {"every_steps": 7, "keep_last": 5},
        "eval": {"every_steps": 3},
        "log": {"every_steps": 3},
    }
    current = json.loads(json.dumps(base))
    for section, values in allowed.items():
        current[section].update(values)
    changed, refused = compare_configs(base, current)
    assert refused == []
    assert {key for key, _, _ in changed} == {
        f"{s}.{k}" for s, values in allowed.items() for k in values
    }
    for key in ("model.network", "head.loss", "head.margin", "data.num_classes", "optimizer.name"):
        section, field = key.split(".")
        other = json.loads(json.dumps(base))
        other[section][field] = "changed"
        assert [r[0] for r in compare_configs(base, other)[1]] == [key]
    assert not resume_policies(Config)["optimizer.name"].may_change


def test_pk_sampler_global_batch_must_match() -> None:
    base = config_to_dict(make_cfg("/tmp/x", "data.sampler=pk"))
    other = json.loads(json.dumps(base))
    other["data"]["batch_size"] = 4
    assert compare_configs(base, other, 2, 4)[1] == []  # 8 x 2 == 4 x 4
    refused = compare_configs(base, other, 2, 2)[1]
    assert [r[0] for r in refused] == ["data.batch_size x world size"]


# ------------------------------------------------------------- item 2: lineages
def test_rollback_starts_a_lineage_and_deletes_neither_its_origin_nor_its_saves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Run A saves steps 2, 4, 6. Run B resumes from step 2 with keep_last=1 and saves
    every step up to 5: it keeps step 2 (its origin), its newest (5) and A's newest
    (6, another lineage); ``auto`` then picks B's step 5, not A's step 6."""
    _trainer(
        tmp_path, "train.max_steps=6", "checkpoint.every_steps=2", "checkpoint.keep_last=3"
    ).fit()
    assert _names(tmp_path) == ["step-00000002", "step-00000004", "step-00000006"]
    origin = tmp_path / "checkpoints" / "step-00000002"
    b = _trainer(
        tmp_path,
        f"checkpoint.resume={origin}",
        "checkpoint.keep_last=1",
        "checkpoint.every_steps=1",
        "train.max_steps=5",
    )
    with caplog.at_level("WARNING", logger="trainer"):
        assert b.maybe_resume() == origin
        b.fit()
    assert "new checkpoint lineage" in caplog.text
    assert _names(tmp_path) == ["step-00000002", "step-00000005", "step-00000006"]
    meta = json.loads((tmp_path / "checkpoints/step-00000005/meta.json").read_text())
    assert meta["parent"] == str(origin)
    c = _trainer(tmp_path, "checkpoint.keep_last=1")
    assert c.maybe_resume() == tmp_path / "checkpoints" / "step-00000005" and c.step == 5


def test_continuing_the_newest_checkpoint_keeps_its_lineage(tmp_path: Path) -> None:
    _trainer(tmp_path, "train.max_steps=2", "checkpoint.every_steps=1").fit()
    t = _trainer(tmp_path, "train.max_steps=4", "checkpoint.every_steps=1")
    t.maybe_resume()
    t.fit()
    assert _names(tmp_path) == ["step-00000003", "step-00000004"]  # keep_last=2 of one lineage
    lineages = {
        json.loads((p / "meta.json").read_text())["lineage"]
        for p in (tmp_path / "checkpoints").glob("step-*")
    }
    assert len(lineages) == 1


# ------------------------------------------------------------- item 3: checksums
def _flip_tensor_bytes(file: Path, tensor: torch.Tensor) -> None:
    """Overwrite ``tensor``'s stored bytes inside ``file`` with NaNs (same size)."""
    data = bytearray(file.read_bytes())
    raw = tensor.detach().cpu().contiguous().numpy().tobytes()
    at = data.find(raw)
    assert at >= 0, "tensor bytes not found"
    nan = torch.full_like(tensor, float("nan")).numpy().tobytes()
    data[at : at + len(raw)] = nan
    file.write_bytes(bytes(data))


def test_flipped_tensor_bytes_fall_back_to_the_previous_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = _trainer(tmp_path, "train.max_steps=4", "checkpoint.every_steps=2")
    first.fit()
    newest = tmp_path / "checkpoints" / "step-00000004"
    weight = first.backbone[0].weight
    _flip_tensor_bytes(newest / "trainer.pt", weight)
    t = _trainer(tmp_path)
    with caplog.at_level("WARNING", logger="trainer"):
        assert t.maybe_resume() == tmp_path / "checkpoints" / "step-00000002" and t.step == 2
    assert "step-00000004/trainer.pt fails its checksum" in caplog.text
    assert "falling back to" in caplog.text
    assert all(torch.isfinite(p).all() for p in t.stepper.params())
    # named explicitly: refused, naming the file and the previous checkpoint
    named = _trainer(tmp_path / "other", f"checkpoint.resume={newest}")
    with pytest.raises(
        DamagedCheckpointError, match=r"trainer\.pt fails its checksum.*step-00000002"
    ):
        named.maybe_resume()


def _corrupt_rank1_shard(rank: int, world: int, out: str) -> dict[str, Any]:
    t = _trainer(Path(out), "train.max_steps=4", "checkpoint.every_steps=2", world=world, rank=rank)
    t.fit()
    t.ctx.barrier()
    if rank == 1:
        newest = Path(out) / "checkpoints" / "step-00000004"
        _flip_tensor_bytes(newest / "head-00001.pt", t.head.weight)
    t.ctx.barrier()
    fresh = _trainer(Path(out), world=world, rank=rank)
    path = fresh.maybe_resume()
    return {"path": str(path), "step": fresh.step}


def test_damaged_shard_seen_by_one_rank_makes_every_rank_fall_back(tmp_path: Path) -> None:
    """Only rank 1 reads ``head-00001.pt``: its checksum failure reaches rank 0, and
    both resume from step 2."""
    results = run_ranks(_corrupt_rank1_shard, 2, str(tmp_path))
    assert [r["step"] for r in results] == [2, 2]
    assert all(r["path"].endswith("step-00000002") for r in results)


def test_nonfinite_checkpoint_is_skipped_by_auto(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint holding NaN weights (written by an earlier version) is damaged."""
    t = _trainer(tmp_path, "train.max_steps=2")
    t.fit()
    with torch.no_grad():
        t.backbone[0].weight[0, 0] = float("nan")
    t.step = 3
    t.checkpointer.write(t.checkpointer.collect())  # unchecked, as the old trainer saved
    fresh = _trainer(tmp_path)
    with caplog.at_level("WARNING", logger="trainer"):
        assert fresh.maybe_resume().name == "step-00000002"
    assert "step-00000003 holds NaN/Inf values in backbone" in caplog.text


# ------------------------------------------- item 4: no non-finite save or export
def _diverge(t: Trainer) -> None:
    """Infinite weight decay: the first step's update makes the weights non-finite
    (its loss and gradient are finite, so it is not skipped); every later step is."""
    for optimizer in t.stepper.optimizers():
        for group in optimizer.param_groups:
            group["weight_decay"] = float("inf")


def test_run_ending_in_a_bad_streak_fails_without_saving_or_exporting(tmp_path: Path) -> None:
    t = _trainer(tmp_path, "train.max_steps=4")
    _diverge(t)
    with pytest.raises(TrainingError, match=r"step 4: training ended in a bad streak") as info:
        t.fit()
    assert "Last good checkpoint: none" in str(info.value)
    assert not (tmp_path / "backbone.pt").exists()
    assert _names(tmp_path) == []


def test_nonfinite_weights_are_never_saved_and_last_good_means_finite(tmp_path: Path) -> None:
    """Diverging right after resuming from step 2: the save at step 3 (before any bad
    step was seen) is refused and the error names step 2, the last finite checkpoint."""
    _trainer(tmp_path, "train.max_steps=2").fit()
    exported = (tmp_path / "backbone.pt").read_bytes()  # the first run's, finite
    t = _trainer(tmp_path, "checkpoint.every_steps=1", "train.max_steps=6")
    good = t.maybe_resume()
    _diverge(t)
    with pytest.raises(TrainingError, match=r"step 3: .*NaN/Inf.*no checkpoint written") as info:
        t.fit()
    assert f"Last good checkpoint: {good}" in str(info.value)
    assert _names(tmp_path) == ["step-00000002"]
    assert (tmp_path / "backbone.pt").read_bytes() == exported  # not overwritten
    with pytest.raises(TrainingError, match="not exported"):
        t.export_backbone()


# -------------------------------------- item 15: a skipped incomplete checkpoint
def test_auto_warns_when_it_skips_an_incomplete_newest_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _trainer(tmp_path, "train.max_steps=4", "checkpoint.every_steps=2").fit()
    shard = tmp_path / "checkpoints" / "step-00000004" / "head-00000.pt"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    t = _trainer(tmp_path)
    with caplog.at_level("WARNING", logger="trainer"):
        assert t.maybe_resume().name == "step-00000002"
    assert "skipping" in caplog.text and "step-00000004" in caplog.text
    assert f"head-00000.pt has {size // 2} bytes, meta.json records {size}" in caplog.text


def test_resume_with_another_per_rank_batch_warns_that_the_global_batch_changed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The docs promise a warning when the per-rank batch changes on resume (the global
    batch, steps per epoch and the LR schedule change with it); none when nothing did."""
    x, y = dataset()
    make_trainer(make_cfg(tmp_path, "data.batch_size=8", "train.max_steps=2"),
                 TensorLoader(x, y, 8, 0, 1)).fit()  # fmt: skip
    same = make_trainer(make_cfg(tmp_path, "data.batch_size=8"), TensorLoader(x, y, 8, 0, 1))
    with caplog.at_level("WARNING", logger="trainer"):
        same.maybe_resume()
    assert "global batch" not in caplog.text
    caplog.clear()
    smaller = make_trainer(make_cfg(tmp_path, "data.batch_size=4"), TensorLoader(x, y, 4, 0, 1))
    with caplog.at_level("WARNING", logger="trainer"):
        smaller.maybe_resume()
    assert "global batch changed 8 -> 4" in caplog.text
    assert f"now {smaller.steps_per_epoch}" in caplog.text
