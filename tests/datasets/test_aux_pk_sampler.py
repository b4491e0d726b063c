"""PKSampler: P x K batches of distinct identities, disjoint ranks, per-epoch plans,
small-identity policies, mid-epoch resume; FaceDataset.labels without image decoding."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from datasets.discovery import open_dataset
from datasets.face_layout import FaceRecWriter
from datasets.pk_sampler import PKSampler
from datasets.recordio import IndexedRecordIO, IRHeader, pack


def _labels(seed: int = 0, classes: int = 30) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 12, classes)
    counts[3] = 40  # an over-represented identity
    return rng.permutation(np.repeat(np.arange(classes), counts))


def _rank_batches(labels, p, k, world, epoch=0, **kw) -> list[list[list[int]]]:
    """Per rank, the list of its batches (lists of indices) for one epoch."""
    out = []
    for r in range(world):
        s = PKSampler(labels, p, k, rank=r, world_size=world, seed=4, **kw)
        s.set_epoch(epoch)
        flat = [i for i, _ in s]
        out.append([flat[j : j + p * k] for j in range(0, len(flat), p * k)])
    return out


@pytest.mark.parametrize("policy", ["replace", "drop"])
def test_batches_are_p_identities_by_k_images_disjoint_over_ranks(policy: str) -> None:
    labels = _labels()
    p, k, world = 3, 4, 2
    per_rank = _rank_batches(labels, p, k, world, small_identity=policy)
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) > 0
    counts = np.bincount(labels)
    for step in range(len(per_rank[0])):
        global_ids: list[int] = []
        for r in range(world):
            batch = per_rank[r][step]
            assert len(batch) == p * k
            groups = [labels[batch[g * k : (g + 1) * k]] for g in range(p)]
            for g in groups:
                assert len(set(g.tolist())) == 1  # K images of one identity, contiguous
            ids = [int(g[0]) for g in groups]
            global_ids += ids
            for g, ident in zip(range(p), ids, strict=True):
                members = batch[g * k : (g + 1) * k]
                if counts[ident] >= k:  # no duplicate image when the identity has K
                    assert len(set(members)) == k
                else:
                    assert policy == "replace"
        assert len(global_ids) == len(set(global_ids)) == world * p  # disjoint ranks
    if policy == "drop":
        used = {int(labels[i]) for b in per_rank[0] + per_rank[1] for i in b}
        assert used <= set(np.flatnonzero(counts >= k).tolist())


def test_replace_policy_covers_almost_every_image() -> None:
    labels = _labels(1)
    per_rank = _rank_batches(labels, 2, 4, 2, small_identity="replace")
    seen = {i for batches in per_rank for b in batches for i in b}
    # everything but the dropped tail (incomplete last batch, the big identity's excess)
    missing = set(range(len(labels))) - seen
    assert len(missing) <= 0.25 * len(labels)
    assert Counter(int(labels[i]) for i in missing).most_common(1)[0][0] == 3


def test_plan_is_seeded_per_epoch_and_world_size_invariant() -> None:
    labels = _labels(2)
    a = PKSampler(labels, 6, 3, rank=0, world_size=1, seed=1)
    assert np.array_equal(a.plan(0), PKSampler(labels, 6, 3, rank=0, world_size=1, seed=1).plan(0))
    assert not np.array_equal(a.plan(0), a.plan(1))
    assert not np.array_equal(a.plan(0), PKSampler(labels, 6, 3, 0, 1, seed=2).plan(0))
    # 1 rank x P=6 sees the global batches of 2 ranks x P=3, with the same aug seeds
    one = list(PKSampler(labels, 6, 3, rank=0, world_size=1, seed=1))
    two = [list(PKSampler(labels, 3, 3, rank=r, world_size=2, seed=1)) for r in range(2)]
    merged = []
    for b in range(len(one) // 18):
        merged += two[0][b * 9 : (b + 1) * 9] + two[1][b * 9 : (b + 1) * 9]
    assert merged == one


@pytest.mark.parametrize(("w0", "p0", "w1", "p1"), [(2, 3, 2, 3), (2, 3, 3, 2), (1, 6, 2, 3)])
def test_mid_epoch_resume(w0: int, p0: int, w1: int, p1: int) -> None:
    labels, k, epoch, done = _labels(3), 2, 1, 3
    full = _rank_batches(labels, w0 * p0, k, 1, epoch=epoch)[0]
    seen = []
    state = None
    for r in range(w0):
        s = PKSampler(labels, p0, k, rank=r, world_size=w0, seed=4)
        s.set_epoch(epoch)
        it = iter(s)
        for _ in range(done * p0 * k):
            seen.append(next(it)[0])
        if r == 0:
            state = s.state_dict(batches_done=done)
    assert state is not None and state["batches_done"] == done
    rest = []
    for r in range(w1):
        s = PKSampler(labels, p1, k, rank=r, world_size=w1, seed=4)
        s.load_state_dict(state)
        s.set_epoch(epoch)  # same epoch: keeps the position
        assert len(s) == (len(full) - done) * p1 * k
        rest.append([i for i, _ in s])
    assert sorted(seen + [i for r in rest for i in r]) == sorted(i for b in full for i in b)
    s = PKSampler(labels, p1, k, rank=0, world_size=w1, seed=4)
    s.load_state_dict(state)
    s.set_epoch(epoch + 1)  # a new epoch starts from the beginning
    assert len(s) == s.batches_per_epoch() * p1 * k


def test_pk_sampler_errors() -> None:
    labels = np.repeat(np.arange(4), [1, 1, 5, 5])
    with pytest.raises(ValueError, match="only 2 have >= k=4 images"):
        PKSampler(labels, 3, 4, rank=0, world_size=1, small_identity="drop")
    with pytest.raises(ValueError, match="world_size \\* p = 8"):
        PKSampler(labels, 4, 2, rank=0, world_size=2)
    with pytest.raises(ValueError, match="small_identity"):
        PKSampler(labels, 1, 2, rank=0, world_size=1, small_identity="pad")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="labels must be >= 0"):
        PKSampler([0, -1, 1], 1, 2, rank=0, world_size=1)
    s = PKSampler(labels, 2, 2, rank=0, world_size=1)
    with pytest.raises(ValueError, match="global_identities=4"):
        s.load_state_dict({**PKSampler(labels, 4, 2, 0, 1).state_dict(), "global_identities": 4})


def _write_rec(tmp_path, labels, face_layout: bool) -> None:
    if face_layout:
        w = FaceRecWriter(tmp_path)
        for label in sorted(labels):
            w.add(label, b"not an image")
        w.close()
        return
    w = IndexedRecordIO(tmp_path / "train.idx", tmp_path / "train.rec", "w")
    for key, label in enumerate(labels):
        # every third record carries an array label (the header's slow path)
        header = IRHeader(0, [float(label), 7.0] if key % 3 == 1 else float(label), key, 0)
        w.write_idx(key, pack(header, b"\x00" * (key % 5)))
    w.close()
    (tmp_path / "property").write_text(f"{max(labels) + 1},112,112\n")


@pytest.mark.parametrize("face_layout", [True, False])
def test_dataset_labels_from_record_headers(tmp_path, face_layout: bool) -> None:
    labels = [int(v) for v in _labels(5, classes=9)]
    _write_rec(tmp_path, labels, face_layout)
    ds = open_dataset(tmp_path)
    expected = sorted(labels) if face_layout else labels
    got = ds.labels()
    assert got.dtype == np.int64 and got.tolist() == expected
    assert ds._header_labels().tolist() == expected
    sampler = PKSampler(got, 2, 2, rank=0, world_size=1)
    assert all(ds.label_of(i) == got[i] for i, _ in sampler)
