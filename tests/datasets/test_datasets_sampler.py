"""DistributedFaceSampler: disjoint shards, per-epoch reshuffle, mid-epoch and resharded resume."""

from __future__ import annotations

import pytest

from datasets.sampler import DistributedFaceSampler


def _global_batches(n: int, batch: int, world: int, epoch: int = 0, **kw) -> list[list[int]]:
    """Global batches (concatenated over ranks) of one epoch."""
    per_rank = []
    for r in range(world):
        s = DistributedFaceSampler(n, batch, rank=r, world_size=world, seed=3, **kw)
        s.set_epoch(epoch)
        per_rank.append([i for i, _ in s])
    steps = len(per_rank[0]) // batch
    return [
        [i for r in range(world) for i in per_rank[r][k * batch : (k + 1) * batch]]
        for k in range(steps)
    ]


def test_disjoint_shards_and_drop_last() -> None:
    n, b, w = 103, 4, 3
    batches = _global_batches(n, b, w)
    flat = [i for g in batches for i in g]
    assert len(flat) == len(set(flat)) == (n // (b * w)) * b * w
    assert all(len(g) == b * w for g in batches)


def test_pad_policy_wraps_around() -> None:
    batches = _global_batches(10, 4, 2, drop_last=False)
    flat = [i for g in batches for i in g]
    assert len(flat) == 16 and set(flat) == set(range(10))


def test_reshuffled_per_epoch_and_deterministic() -> None:
    a, b = _global_batches(50, 5, 2, epoch=0), _global_batches(50, 5, 2, epoch=1)
    assert a != b and a == _global_batches(50, 5, 2, epoch=0)
    s = DistributedFaceSampler(20, 2, rank=0, world_size=1, shuffle=False)
    assert [i for i, _ in s] == list(range(20))


def test_world_size_invariance() -> None:
    # 1 rank x batch 12 sees exactly the global batches of 3 ranks x batch 4
    one = _global_batches(100, 12, 1)
    three = _global_batches(100, 4, 3)
    assert one == three


def test_aug_seeds_do_not_depend_on_world_size() -> None:
    def seeds(world: int, batch: int) -> dict[int, int]:
        out = {}
        for r in range(world):
            s = DistributedFaceSampler(40, batch, rank=r, world_size=world, seed=1)
            out.update(dict(s))
        return out

    assert seeds(1, 8) == seeds(2, 4)


@pytest.mark.parametrize(("w0", "b0", "w1", "b1"), [(2, 4, 2, 4), (4, 2, 2, 4), (2, 3, 3, 2)])
def test_mid_epoch_resume_no_repeat_no_skip(w0: int, b0: int, w1: int, b1: int) -> None:
    n, epoch, done = 97, 2, 5
    # first run: every rank trains ``done`` batches, rank 0 checkpoints
    seen: list[int] = []
    state = None
    for r in range(w0):
        s = DistributedFaceSampler(n, b0, rank=r, world_size=w0, seed=9)
        s.set_epoch(epoch)
        seen += [i for i, _ in list(s)[: done * b0]]
        if r == 0:
            state = s.state_dict(batches_done=done)
    assert state["consumed"] == done * b0 * w0 and state["epoch"] == epoch
    # resume, possibly with another world size / batch size
    for r in range(w1):
        s = DistributedFaceSampler(n, b1, rank=r, world_size=w1, seed=9)
        s.load_state_dict(state)
        s.set_epoch(epoch)  # same epoch: keeps the position
        seen += [i for i, _ in s]
    assert len(seen) == len(set(seen))  # nothing repeated
    ref = DistributedFaceSampler(n, 1, rank=0, world_size=1, seed=9).permutation(epoch).tolist()
    assert sorted(seen) == sorted(ref[: len(seen)])  # nothing skipped: a prefix of the order
    assert n - len(seen) < b1 * w1  # only the final incomplete global batch is dropped
    # the next epoch starts from its beginning
    s.set_epoch(epoch + 1)
    assert len(s) == (n // (b1 * w1)) * b1


def test_bad_arguments_and_state() -> None:
    with pytest.raises(ValueError, match="rank 2"):
        DistributedFaceSampler(10, 2, rank=2, world_size=2)
    s = DistributedFaceSampler(10, 2, rank=0, world_size=1, seed=1)
    with pytest.raises(ValueError, match="for 10 samples, this dataset has 20"):
        DistributedFaceSampler(20, 2, rank=0, world_size=1, seed=1).load_state_dict(s.state_dict())


def test_rank_and_world_size_default_to_the_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of rank / world_size left out comes from the default group (the library's one
    lookup, partial_fc.collectives.rank_and_world_size); without a group, 0 and 1."""
    import torch.distributed as dist

    assert (DistributedFaceSampler(30, 2).rank, DistributedFaceSampler(30, 2).world_size) == (0, 1)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 3)
    for kwargs, expected in (
        ({}, (2, 3)),
        ({"rank": 1}, (1, 3)),
        ({"world_size": 5}, (2, 5)),
        ({"rank": 0, "world_size": 1}, (0, 1)),
    ):
        s = DistributedFaceSampler(30, 2, **kwargs)
        assert (s.rank, s.world_size) == expected, kwargs
