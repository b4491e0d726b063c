"""Checkpoints: exact resume, resharded resume (4 -> 2, 2 -> 3; K=3 sub-centres 2 -> 1, 3),
the on-disk format and what format 2 requires (its format, checksums and facts), atomic
save, and how often a resume touches the file system's metadata."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from common.dist import DistContext
from configs import ConfigError
from partial_fc import ArcFace, PartialFC
from tests.distributed import run_ranks
from tests.trainer.test_trainer import (
    EMB,
    TensorLoader,
    dataset,
    gather_state,
    make_backbone,
    make_cfg,
    make_trainer,
)
from tests.trainer.test_trainer_aux import make_aux_trainer
from trainer.checkpoint import (
    CheckpointError,
    CheckpointStorage,
    DamagedCheckpointError,
    UnusableCheckpointError,
)
from trainer.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

# 96 samples, global batch 24 -> 4 steps per epoch; 3 epochs -> 12 steps.
RESUME_ARGS = ("train.epochs=3", "head.sample_rate=0.5", "optimizer.name=sgd")


def _run(rank: int, world: int, out: str, batch: int, *extra: str, dropout: float = 0.2) -> dict:
    x, y = dataset()
    cfg = make_cfg(out, f"data.batch_size={batch}", *RESUME_ARGS, *extra)
    t = make_trainer(cfg, TensorLoader(x, y, batch, rank, world), dropout=dropout)
    t.maybe_resume()
    start = t.step
    t.fit()
    state = gather_state(t)
    state["head.opt"] = _gather_opt(t)
    return {"state": state, "step": t.step, "start": start}


def _gather_opt(t) -> torch.Tensor:
    buf = next(iter(t.opt_head.state.values()))["momentum_buffer"]
    rows = t.ctx.all_gather_object((t.head.class_start, buf.detach().clone()))
    return torch.cat([b for _, b in sorted(rows, key=lambda r: r[0])])


def _resume_equality(rank: int, world: int, tmp: str) -> tuple[dict, dict]:
    full = _run(rank, world, f"{tmp}/full", 12)
    # 5 steps: stops mid-epoch 2 (4 steps per epoch), then resume in a fresh trainer
    _run(rank, world, f"{tmp}/split", 12, "train.max_steps=5")
    resumed = _run(rank, world, f"{tmp}/split", 12)
    return full, resumed


def test_resume_is_exact(tmp_path: Path) -> None:
    """2N steps == N steps + resume + N steps, bit for bit (sampling, dropout RNG, momentum)."""
    full, resumed = run_ranks(_resume_equality, 2, str(tmp_path))[0]
    assert full["step"] == resumed["step"] == 12
    for key, value in full["state"].items():
        assert torch.equal(value, resumed["state"][key]), key


def _reshard(rank: int, world: int, out: str, batch: int, *extra: str) -> dict:
    # no dropout and full softmax: their random streams are per rank, hence per world size
    return _run(rank, world, out, batch, "head.sample_rate=1.0", *extra, dropout=0.0)


def _reshard_stage(rank: int, world: int, tmp: str, resume_from: str | None, save_to: str | None):
    """On this world size: finish ``resume_from``'s run, run the reference from scratch,
    and start (5 steps of) the run that the next stage resumes."""
    batch = 24 // world  # the global batch stays 24 at every world size
    out = {}
    if resume_from is not None:
        out["resumed"] = _reshard(rank, world, f"{tmp}/{resume_from}", batch)
        out["reference"] = _reshard(rank, world, f"{tmp}/ref{world}", batch)
    if save_to is not None:
        out["saved"] = _reshard(rank, world, f"{tmp}/{save_to}", batch, "train.max_steps=5")
    return out


def test_resharded_resume_4_to_2_and_2_to_3(tmp_path: Path) -> None:
    """A run saved on W ranks resumes on W' ranks: the head rows and their optimizer
    state are re-split by global class, and training continues as if it had run on W'
    all along (same global batch of 24; the sample order is world-size independent)."""
    tmp = str(tmp_path)
    run_ranks(_reshard_stage, 4, tmp, None, "from4")
    meta = json.loads((tmp_path / "from4/checkpoints/step-00000005/meta.json").read_text())
    assert meta["world_size"] == 4 and len(meta["shards"]) == 4
    two = run_ranks(_reshard_stage, 2, tmp, "from4", "from2")[0]
    three = run_ranks(_reshard_stage, 3, tmp, "from2", None)[0]
    for result in (two, three):
        resumed, reference = result["resumed"], result["reference"]
        assert resumed["step"] == reference["step"] == 12
        for key, value in reference["state"].items():
            torch.testing.assert_close(resumed["state"][key], value, atol=1e-5, rtol=0, msg=key)
        # the resumed run did not silently start from scratch
        assert resumed["start"] == 5 and reference["start"] == 0


def _load_head_only(rank: int, world: int, ckpt: str) -> tuple[int, torch.Tensor, torch.Tensor]:
    from partial_fc.sharding import class_range

    cs, nl = class_range(11, rank, world)
    storage = CheckpointStorage(Path(ckpt).parent)
    head, optim = storage.load_head_shard(storage.open(ckpt), cs, nl, 1)
    return cs, head["weight"], optim["state"][0]["momentum_buffer"]


def test_head_shards_reslice_by_global_class(tmp_path: Path) -> None:
    """Loading a 1-rank checkpoint's head for any class range returns those rows."""
    x, y = dataset()
    cfg = make_cfg(tmp_path, "train.max_steps=2")
    t = make_trainer(cfg, TensorLoader(x, y, 8, 0, 1))
    t.fit()
    ckpt = t.checkpointer.latest()
    full_w = t.head.weight.detach()
    full_m = next(iter(t.opt_head.state.values()))["momentum_buffer"]
    for world in (2, 3, 4, 12):  # 12 > 11 classes: the last rank holds none
        for rank in range(world):
            cs, w, m = _load_head_only(rank, world, str(ckpt))
            assert torch.equal(w, full_w[cs : cs + w.shape[0]])
            assert torch.equal(m, full_m[cs : cs + m.shape[0]])


class CrashingStorage(CheckpointStorage):
    """Storage whose process "dies" (``KeyboardInterrupt``) half-way through the
    third file it writes while ``crash`` is set."""

    crash = False
    written = 0

    def write_file(self, obj, path: Path) -> str:
        if self.crash:
            self.written += 1
            if self.written == 3:
                path.write_bytes(b"half a file")
                raise KeyboardInterrupt("simulated crash during save")
        return super().write_file(obj, path)


def test_atomic_save_survives_crash(tmp_path: Path) -> None:
    x, y = dataset()
    cfg = make_cfg(tmp_path, "checkpoint.keep_last=2")
    t = make_trainer(cfg, TensorLoader(x, y, 8, 0, 1), storage=CrashingStorage)
    t.train_step([(x[:8], y[:8])])
    good = t.save_checkpoint()
    saved_weight = t.head.weight.detach().clone()
    t.train_step([(x[8:16], y[8:16])])

    t.checkpointer.storage.crash = True
    with pytest.raises(KeyboardInterrupt):
        t.save_checkpoint()
    directory = tmp_path / "checkpoints"
    assert (directory / ".tmp-step-00000002").is_dir()  # the partial save is there...
    assert t.checkpointer.latest() == good  # ...but never picked
    # a renamed directory that lost a file (or has a truncated one) is not picked either
    broken = directory / "step-00000007"
    broken.mkdir()
    (broken / "meta.json").write_text(json.dumps({"files": {"trainer.pt": 10**6}}))
    assert t.checkpointer.latest() == good
    os.rename(broken, directory / "step-00000008")  # no meta at all after removing it
    (directory / "step-00000008" / "meta.json").unlink()
    assert t.checkpointer.latest() == good

    fresh = make_trainer(make_cfg(tmp_path), TensorLoader(x, y, 8, 0, 1))
    assert fresh.maybe_resume() == good and fresh.step == 1
    assert torch.equal(fresh.head.weight, saved_weight)

    # the next save succeeds, cleans the stale temporary directory and keeps the last 2
    fresh.train_step([(x[:8], y[:8])])
    second = fresh.save_checkpoint()
    fresh.train_step([(x[:8], y[:8])])
    third = fresh.save_checkpoint()
    assert not (directory / ".tmp-step-00000002").exists()
    assert [p.name for p in fresh.checkpointer.storage.complete()] == [second.name, third.name]


# ------------------------------------------------- sub-centres, AdamW, margins
# 101 classes (labels use 11): a sample of half the classes is larger than the global
# batch of 24, so rows take part in different numbers of steps.
K3_CLASSES = 101
K3_ARGS = (
    "train.epochs=3", "head.sample_rate=0.5", "optimizer.name=adamw",
    f"data.num_classes={K3_CLASSES}",
)  # fmt: skip


def _k3_trainer(rank: int, world: int, out: str, *extra: str) -> Trainer:
    """A K=3 sampled head with AdamW (row-indexed ``exp_avg``, ``exp_avg_sq``,
    ``row_step``) and per-class margins, global batch 24 at any world size."""
    x, y = dataset()
    batch = 24 // world
    cfg = make_cfg(out, f"data.batch_size={batch}", *K3_ARGS, *extra)
    ctx = DistContext.current()
    head = PartialFC(
        K3_CLASSES, EMB, ArcFace(16.0, torch.full((K3_CLASSES,), 0.3)), num_subcenters=3,
        sample_rate=0.5, seed=cfg.train.seed,
    )  # fmt: skip
    return Trainer(cfg, make_backbone(), head, TensorLoader(x, y, batch, rank, world), ctx)


def _gather_k3(t: Trainer) -> dict[str, torch.Tensor]:
    """The full head matrix and its optimizer state, by global class (rows of class c
    are ``3c .. 3c + 2``), and the head's per-class margins."""
    state = next(iter(t.opt_head.state.values()))
    local = {"weight": t.head.weight.detach().clone()}
    local.update({k: v.detach().clone() for k, v in state.items()})
    rows = t.ctx.all_gather_object((t.head.class_start, local))
    rows.sort(key=lambda r: r[0])
    out = {key: torch.cat([r[1][key] for r in rows]) for key in local}
    out["m2"] = t.head.margin.m2.detach().clone()
    return out


def _k3_save(rank: int, world: int, out: str) -> dict:
    t = _k3_trainer(rank, world, out, "train.max_steps=5")
    # margins changed at run time (an annealing schedule would): saved with the head
    t.head.set_margins(torch.linspace(0.2, 0.5, K3_CLASSES))
    t.fit()
    return _gather_k3(t)


def _k3_resume(rank: int, world: int, out: str) -> dict:
    t = _k3_trainer(rank, world, out)
    assert t.maybe_resume() is not None and t.step == 5
    return _gather_k3(t)


def test_subcentre_head_and_adamw_state_reshard_by_global_class(tmp_path: Path) -> None:
    """K=3 sub-centres saved on 2 ranks resume on 1 and on 3 ranks: the gathered head
    weight, every AdamW tensor (moments and the per-row step) and the margins equal
    the saved ones, by global class."""
    out = str(tmp_path / "run")
    saved = run_ranks(_k3_save, 2, out)[0]
    rows = 3 * K3_CLASSES
    assert saved["weight"].shape == (rows, 8) and saved["row_step"].shape == (rows,)
    # sampling left rows with different step counts: a shift of rows would show
    assert len(set(saved["row_step"].tolist())) > 1
    for resumed in (_k3_resume(0, 1, out), run_ranks(_k3_resume, 3, out)[0]):
        assert resumed.keys() == saved.keys()
        for key, value in saved.items():
            assert torch.equal(resumed[key], value), key


# ------------------------------------------------------------- on-disk format
def _aux_trainer(out: Path, *extra: str) -> Trainer:
    x, y = dataset()
    return make_aux_trainer(make_cfg(out, *extra), TensorLoader(x, y, 8, 0, 1))


def test_on_disk_format_is_unchanged(tmp_path: Path) -> None:
    """The names under which the parts are saved are the format (FORMAT_VERSION 2):
    checkpoints written by earlier versions of the trainer must keep loading."""
    t = _aux_trainer(tmp_path, "aux.center_weight=0.1")
    t.train_step([(dataset()[0][:8], dataset()[1][:8])])
    ckpt = t.save_checkpoint()
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "center-00000.pt", "head-00000.pt", "meta.json", "rank-00000.pt", "trainer.pt",
    ]  # fmt: skip
    shared = torch.load(ckpt / "trainer.pt", weights_only=True)
    assert set(shared) == {
        "backbone", "backbone_optimizer", "schedulers", "scaler", "progress", "loader",
        "history", "config", "tracking",  # tracking: optional (older checkpoints lack it)
    }  # fmt: skip
    assert shared["progress"] == {"step": 1, "epoch": 0}
    assert len(shared["schedulers"]) == 3 and shared["schedulers"][0]["lr_lambdas"] == [None]
    assert isinstance(shared["history"], str) and isinstance(shared["config"], str)
    assert set(torch.load(ckpt / "rank-00000.pt", weights_only=True)) == {"rng"}
    shard_keys = {
        "class_start", "num_local", "num_subcenters", "row_start", "rows", "model",
        "model_row_keys", "optim_state", "optim_row_keys", "param_groups",
    }  # fmt: skip
    head = torch.load(ckpt / "head-00000.pt", weights_only=True)
    center = torch.load(ckpt / "center-00000.pt", weights_only=True)
    assert set(head) == set(center) == shard_keys
    assert head["model_row_keys"] == ["weight"] and center["model_row_keys"] == ["centers"]
    assert head["optim_row_keys"] == ["momentum_buffer"]
    meta = json.loads((ckpt / "meta.json").read_text())
    assert {"format", "step", "world_size", "shards", "center_shards", "files"} <= set(meta)
    assert (meta["format"], meta["num_classes"], meta["embedding_size"]) == (2, 11, 8)
    assert meta["shards"] == [{"file": "head-00000.pt", "class_start": 0, "num_local": 11, "K": 1}]


def test_checkpoint_without_centres_resumes_a_run_with_centres(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint written without centre shards (and with two schedulers: a run
    without ``aux.center_weight``) resumes a run with learnable centres: the centres
    start afresh, at the resumed step's learning rate."""
    x, y = dataset()
    plain = _aux_trainer(tmp_path)
    for i in range(3):
        plain.train_step([(x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8])])
    ckpt = plain.save_checkpoint()
    assert "center_shards" not in json.loads((ckpt / "meta.json").read_text())
    resumed = _aux_trainer(tmp_path, "aux.center_weight=0.1")
    fresh_centres = resumed.center.centers.detach().clone()
    with caplog.at_level("WARNING", logger="trainer"):
        assert resumed.maybe_resume() == ckpt and resumed.step == 3
    assert "no center shards" in caplog.text
    assert torch.equal(resumed.center.centers.detach(), fresh_centres)
    torch.testing.assert_close(resumed.head.weight, plain.head.weight, atol=0, rtol=0)
    lr = plain.opt_backbone.param_groups[0]["lr"]
    assert lr != resumed.cfg.optimizer.lr  # the schedule has moved: the test means something
    assert [o.param_groups[0]["lr"] for o in resumed.stepper.optimizers()] == [lr, lr, lr]
    assert resumed.schedulers[2].last_epoch == 3


# ------------------------------------------------- what format 2 requires
def _two_checkpoints(out: Path) -> tuple[Path, Path]:
    """Steps 2 and 4 of one run (1 rank)."""
    x, y = dataset()
    cfg = make_cfg(out, "train.max_steps=4", "checkpoint.every_steps=2")
    make_trainer(cfg, TensorLoader(x, y, 8, 0, 1)).fit()
    return out / "checkpoints" / "step-00000002", out / "checkpoints" / "step-00000004"


def _edit_meta(ckpt: Path, edit) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    edit(meta)
    (ckpt / "meta.json").write_text(json.dumps(meta))


def _fresh(out: Path, *extra: str):
    x, y = dataset()
    return make_trainer(make_cfg(out, *extra), TensorLoader(x, y, 8, 0, 1))


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda meta: meta.update(format=1), "has checkpoint format 1; this trainer reads "
         "format 2 only"),
        (lambda meta: meta.pop("format"), "records no checkpoint format in its meta.json"),
    ],
    ids=["format-1", "no-format"],
)  # fmt: skip
def test_a_checkpoint_of_an_older_or_unrecorded_format_is_not_resumed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, edit, reason: str
) -> None:
    """``auto`` falls back past it naming why; named explicitly, it is refused, naming
    why and the previous complete checkpoint."""
    older, newest = _two_checkpoints(tmp_path)
    _edit_meta(newest, edit)
    t = _fresh(tmp_path)
    with caplog.at_level("WARNING", logger="trainer"):
        assert t.maybe_resume() == older and t.step == 2
    assert f"checkpoint {newest} cannot be resumed: {newest} {reason}" in caplog.text
    assert f"falling back to {older}" in caplog.text
    named = _fresh(tmp_path / "other", f"checkpoint.resume={newest}")
    with pytest.raises(UnusableCheckpointError, match=reason) as info:
        named.maybe_resume()
    assert f"The previous complete checkpoint is {older}" in str(info.value)
    assert named.step == 0


def test_a_checkpoint_of_a_newer_format_is_refused(tmp_path: Path) -> None:
    """A newer trainer's checkpoint stops the run (no fall back past it: its directory
    is that trainer's)."""
    _, newest = _two_checkpoints(tmp_path)
    _edit_meta(newest, lambda meta: meta.update(format=3))
    with pytest.raises(CheckpointError, match=r"has checkpoint format 3, newer than .* 2"):
        _fresh(tmp_path).maybe_resume()


def test_a_file_without_a_recorded_checksum_fails_verify(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    older, newest = _two_checkpoints(tmp_path)
    _edit_meta(newest, lambda meta: meta["sha256"].pop("head-00000.pt"))
    storage = CheckpointStorage(newest.parent)
    checkpoint = storage.open(newest)
    assert checkpoint.complete
    storage.verify(checkpoint, ["trainer.pt"])  # the others still check
    with pytest.raises(DamagedCheckpointError, match=r"head-00000\.pt has no SHA-256"):
        storage.verify(checkpoint, ["trainer.pt", "head-00000.pt"])
    t = _fresh(tmp_path)
    with caplog.at_level("WARNING", logger="trainer"):
        assert t.maybe_resume() == older
    assert "head-00000.pt has no SHA-256" in caplog.text


def test_a_checkpoint_without_a_recorded_fact_fails_the_resume_check(tmp_path: Path) -> None:
    _, newest = _two_checkpoints(tmp_path)
    _edit_meta(newest, lambda meta: meta.pop("num_classes"))
    t = _fresh(tmp_path)
    with pytest.raises(ConfigError, match=r"data\.num_classes=11 but the checkpoint records "
                       r"no num_classes"):  # fmt: skip
        t.maybe_resume()
    assert t.step == 0


# ------------------------------------------- metadata operations of a resume
class CountingStorage(CheckpointStorage):
    """Counts the metadata operations on the checkpoints: ``meta.json`` reads by
    checkpoint, size checks (stats) by file."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.meta_reads: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()

    def read_meta(self, checkpoint: Path) -> dict:
        self.meta_reads[checkpoint.name] += 1
        return super().read_meta(checkpoint)

    def file_size(self, path: Path) -> int | None:
        self.stats[f"{path.parent.name}/{path.name}"] += 1
        return super().file_size(path)


def _count_resume(rank: int, world: int, out: str) -> dict:
    x, y = dataset()
    batch = 8 // world
    args = (f"data.batch_size={batch}", "checkpoint.every_steps=2", "checkpoint.keep_last=3")
    make_trainer(
        make_cfg(out, *args, "train.max_steps=6"), TensorLoader(x, y, batch, rank, world)
    ).fit()
    t = make_trainer(
        make_cfg(out, *args), TensorLoader(x, y, batch, rank, world), storage=CountingStorage
    )
    assert t.maybe_resume() is not None and t.step == 6
    storage = t.checkpointer.storage
    return {"meta": dict(storage.meta_reads), "stats": dict(storage.stats)}


def test_a_resume_reads_each_meta_json_and_stats_each_file_once(tmp_path: Path) -> None:
    """2 ranks, 3 checkpoints of 5 files each: rank 0 reads each ``meta.json`` once and
    checks each listed file's size once; rank 1 works from rank 0's listing and
    touches neither."""
    first, second = run_ranks(_count_resume, 2, str(tmp_path))
    assert first["meta"] == {f"step-0000000{s}": 1 for s in (2, 4, 6)}
    assert len(first["stats"]) == 3 * 5 and set(first["stats"].values()) == {1}
    assert second == {"meta": {}, "stats": {}}


def test_the_parts_are_torch_stateful(tmp_path: Path) -> None:
    """Every part the manager holds satisfies ``torch.distributed.checkpoint``'s
    ``Stateful`` protocol (declared structurally in trainer.checkpoint.states, so that
    training does not import that package)."""
    from torch.distributed.checkpoint.stateful import Stateful

    t = _aux_trainer(tmp_path, "aux.center_weight=0.1")
    manager = t.checkpointer
    parts = [*manager.replicated.values(), *manager.sharded.values(), *manager.per_rank.values()]
    assert len(parts) == 9 + 2 + 1  # 9 replicated: tracking (run ids) the ninth
    assert all(isinstance(part, Stateful) for part in parts)
