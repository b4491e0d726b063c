"""Checkpoints: exact resume, resharded resume (4 -> 2, 2 -> 3), atomic save."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import trainer.checkpoint as checkpoint_module
from tests.distributed import run_ranks
from tests.test_trainer import (  # noqa: F401 (one_thread is an autouse fixture)
    TensorLoader,
    dataset,
    gather_state,
    make_cfg,
    make_trainer,
    one_thread,
)
from trainer.checkpoint import CheckpointManager

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
    head, optim = CheckpointManager.load_head_shard(Path(ckpt), cs, nl, 1)
    return cs, head["weight"], optim["state"][0]["momentum_buffer"]


def test_head_shards_reslice_by_global_class(tmp_path: Path) -> None:
    """Loading a 1-rank checkpoint's head for any class range returns those rows."""
    x, y = dataset()
    cfg = make_cfg(tmp_path, "train.max_steps=2")
    t = make_trainer(cfg, TensorLoader(x, y, 8, 0, 1))
    t.fit()
    ckpt = t.checkpoints.latest()
    full_w = t.head.weight.detach()
    full_m = next(iter(t.opt_head.state.values()))["momentum_buffer"]
    for world in (2, 3, 4, 12):  # 12 > 11 classes: the last rank holds none
        for rank in range(world):
            cs, w, m = _load_head_only(rank, world, str(ckpt))
            assert torch.equal(w, full_w[cs : cs + w.shape[0]])
            assert torch.equal(m, full_m[cs : cs + m.shape[0]])


def test_atomic_save_survives_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = dataset()
    cfg = make_cfg(tmp_path, "checkpoint.keep_last=2")
    t = make_trainer(cfg, TensorLoader(x, y, 8, 0, 1))
    t.train_step([(x[:8], y[:8])])
    good = t.save_checkpoint()
    saved_weight = t.head.weight.detach().clone()
    t.train_step([(x[8:16], y[8:16])])

    real_save = checkpoint_module.save_file
    calls = {"n": 0}

    def crashing_save(obj, path):  # the process "dies" while writing its third file
        calls["n"] += 1
        if calls["n"] == 3:
            with open(path, "wb") as fh:
                fh.write(b"half a file")
            raise KeyboardInterrupt("simulated crash during save")
        real_save(obj, path)

    monkeypatch.setattr(checkpoint_module, "save_file", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        t.save_checkpoint()
    monkeypatch.setattr(checkpoint_module, "save_file", real_save)
    directory = tmp_path / "checkpoints"
    assert (directory / ".tmp-step-00000002").is_dir()  # the partial save is there...
    assert t.checkpoints.latest() == good  # ...but never picked
    # a renamed directory that lost a file (or has a truncated one) is not picked either
    broken = directory / "step-00000007"
    broken.mkdir()
    (broken / "meta.json").write_text(json.dumps({"files": {"trainer.pt": 10**6}}))
    assert t.checkpoints.latest() == good
    os.rename(broken, directory / "step-00000008")  # no meta at all after removing it
    (directory / "step-00000008" / "meta.json").unlink()
    assert t.checkpoints.latest() == good

    fresh = make_trainer(make_cfg(tmp_path), TensorLoader(x, y, 8, 0, 1))
    assert fresh.maybe_resume() == good and fresh.step == 1
    assert torch.equal(fresh.head.weight, saved_weight)

    # the next save succeeds, cleans the stale temporary directory and keeps the last 2
    fresh.train_step([(x[:8], y[:8])])
    second = fresh.save_checkpoint()
    fresh.train_step([(x[:8], y[:8])])
    third = fresh.save_checkpoint()
    assert not (directory / ".tmp-step-00000002").exists()
    assert [p.name for p in fresh.checkpoints.complete()] == [second.name, third.name]
