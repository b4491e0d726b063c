"""The resume warning tells the truth about the global batch (``data.batch_size ×
train.grad_accum × world size``): a world-size change with the per-rank batch scaled
to match keeps it, a per-rank batch change alone changes it."""

from __future__ import annotations

from trainer.resume_warning import BatchLayout, batch_change_warning


def _saved(batch: int, world: int, accum: int = 1) -> BatchLayout:
    return BatchLayout.from_config(
        {"data": {"batch_size": batch}, "train": {"grad_accum": accum}}, world
    )


def test_world_size_change_with_scaled_batch_keeps_the_global_batch() -> None:
    text = batch_change_warning(_saved(128, 8), BatchLayout(256, 1, 4), 5000, 100000)
    assert text == (
        "batch layout changed (data.batch_size 128 x train.grad_accum 1 x 8 ranks -> "
        "data.batch_size 256 x train.grad_accum 1 x 4 ranks); the global batch stays 1024, "
        "so steps per epoch (5000) and the LR schedule (100000 steps) are unchanged"
    )
    assert "change with it" not in text


def test_per_rank_batch_change_on_the_same_world_size_warns() -> None:
    text = batch_change_warning(_saved(128, 8), BatchLayout(64, 1, 8), 10000, 200000)
    assert text == (
        "global batch changed 1024 -> 512 (data.batch_size 128 x train.grad_accum 1 x 8 "
        "ranks -> data.batch_size 64 x train.grad_accum 1 x 8 ranks): steps per epoch change "
        "with it (now 10000) and the LR schedule now spans 200000 steps"
    )


def test_unchanged_layout_says_nothing_and_unknown_batch_says_so() -> None:
    assert batch_change_warning(_saved(128, 8, 2), BatchLayout(128, 2, 8), 1, 2) is None
    assert (
        batch_change_warning(BatchLayout.from_config(None, 8), BatchLayout(128, 1, 8), 1, 2) is None
    )
    text = batch_change_warning(BatchLayout.from_config(None, 8), BatchLayout(128, 1, 4), 3, 6)
    assert text is not None and "does not record its per-rank batch" in text
    assert "now 512 (data.batch_size 128 x train.grad_accum 1 x 4 ranks)" in text
