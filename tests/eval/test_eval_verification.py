"""Pair verification: safe .bin loading, the 10-fold protocol, rank-shared extraction."""

from __future__ import annotations

import itertools
import os
import pickle
import struct

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from eval.bin_io import PairSet, load_bin, restricted_loads
from eval.extract import extract_embeddings, module_embedder, rank_slice
from eval.metrics import (
    calculate_roc,
    calculate_val,
    contiguous_folds,
    evaluate,
    l2_normalize,
    threshold_at_far,
)
from eval.pair_verification import summarize, verify_targets
from tests.distributed import run_ranks

# ---------------------------------------------------------------- restricted unpickler


class _OpensFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class _RunsCommand:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("payload", [_OpensFile, _RunsCommand])
def test_crafted_pickle_raises_and_creates_nothing(tmp_path, protocol, payload):
    target = tmp_path / "pwned"
    evil = pickle.dumps(([payload(str(target))], [True]), protocol=protocol)
    path = tmp_path / "evil.bin"
    path.write_bytes(evil)
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        load_bin(path)
    with pytest.raises(pickle.UnpicklingError):
        restricted_loads(evil)
    assert not target.exists()


def test_unpickler_allows_numpy_and_protocol2_bytes():
    obj = ([np.frombuffer(b"\x01\x02", np.uint8), b"ab"], [np.bool_(True), False])
    for protocol in (2, 3, 4, 5):
        bins, same = restricted_loads(pickle.dumps(obj, protocol=protocol))
        assert bins[0].tobytes() == b"\x01\x02" and bins[1] == b"ab"
        assert [bool(s) for s in same] == [True, False]
    arr = restricted_loads(pickle.dumps(np.array([True, False]), protocol=2))
    assert arr.tolist() == [True, False]
    with pytest.raises(pickle.UnpicklingError, match=r"global numpy\..*load is not allowed"):
        restricted_loads(pickle.dumps(np.load, protocol=2))  # any other global is refused


# ---------------------------------------------------------------- load_bin


def _images(n: int, size: int = 112, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _png(bgr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", bgr)
    assert ok
    return buf.tobytes()


def _py2_pickle(bins: list[bytes], issame: list[bool]) -> bytes:
    """Hand-assembled protocol-2 pickle as Python 2 writes it (``str`` = BINSTRING)."""
    out = [b"\x80\x02", b"]", b"("]
    for b in bins:
        out.append(b"T" + struct.pack("<I", len(b)) + b)
    out.append(b"e]")
    out.append(b"(" + b"".join(b"\x88" if s else b"\x89" for s in issame) + b"e")
    out.append(b"\x86.")
    return b"".join(out)


@pytest.mark.parametrize("flavour", ["py2", "py3", "numpy"])
def test_load_bin_formats(tmp_path, flavour):
    imgs = _images(4)
    encoded = [_png(im) for im in imgs]
    issame = [True, False]
    if flavour == "py2":
        data = _py2_pickle(encoded, issame)
    elif flavour == "py3":
        data = pickle.dumps((encoded, issame), protocol=4)
    else:
        data = pickle.dumps(
            ([np.frombuffer(e, np.uint8) for e in encoded], np.array(issame)), protocol=2
        )
    path = tmp_path / "lfw.bin"
    path.write_bytes(data)
    ps = load_bin(path)
    assert ps.name == "lfw" and len(ps) == 2
    assert ps.images.shape == (4, 3, 112, 112) and ps.images.dtype == torch.uint8
    assert ps.issame.tolist() == issame
    for i, im in enumerate(imgs):  # BGR on disk -> RGB CHW in memory
        np.testing.assert_array_equal(ps.images[i].numpy(), im[..., ::-1].transpose(2, 0, 1))


def test_load_bin_resizes_and_validates(tmp_path):
    small = [_png(im) for im in _images(2, size=100)]
    path = tmp_path / "cfp.bin"
    path.write_bytes(pickle.dumps((small, [True]), protocol=4))
    assert load_bin(path).images.shape == (2, 3, 112, 112)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(pickle.dumps((small, [True, False]), protocol=4))
    with pytest.raises(ValueError, match=r"bad\.bin.*2 images for 2 pairs"):
        load_bin(bad)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(pickle.dumps(([b"not an image", b"x"], [True]), protocol=4))
    with pytest.raises(ValueError, match=r"junk\.bin: bins\[0\]"):
        load_bin(junk)


# ---------------------------------------------------------------- protocol: hand-checked


def _pairs_with_distances(d: list[float]) -> np.ndarray:
    """Embeddings whose pair i has squared distance exactly d[i] (sqrt(d) exact)."""
    emb = np.zeros((2 * len(d), 2))
    emb[1::2, 0] = np.sqrt(d)
    return emb


def test_folds_are_contiguous_like_kfold():
    folds = list(contiguous_folds(23, 10))
    assert [len(te) for _, te in folds] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert np.concatenate([te for _, te in folds]).tolist() == list(range(23))
    for tr, te in folds:
        assert sorted(set(tr) | set(te)) == list(range(23)) and not set(tr) & set(te)
    with pytest.raises(ValueError):
        list(contiguous_folds(3, 10))


def test_accuracy_hand_checked():
    # fold 0 tests pairs 0,1 with thresholds chosen on pairs 2,3 and vice versa.
    d = [0.25, 2.25, 1.0, 0.0625]
    same = [True, False, True, False]
    _, _, acc, _, _, _ = evaluate(_pairs_with_distances(d), same, nrof_folds=2)
    # Train {1.0 same, 0.0625 diff}: best accuracy 1/2 first at t=0 -> test {0.25 s, 2.25 d}: 1/2.
    # Train {0.25 same, 2.25 diff}: perfect from t=0.26 -> test {1.0 s, 0.0625 d}: both wrong.
    np.testing.assert_array_equal(acc, [0.5, 0.0])


def test_tpr_fpr_hand_checked():
    d = [0.5, 1.5, 0.7, 2.0]
    same = [True, False, True, False]
    thresholds = np.array([0.0, 1.0, 1.8, 3.0])
    tpr, fpr, acc = calculate_roc(thresholds, np.array(d), np.array(same), nrof_folds=2)
    np.testing.assert_allclose(tpr, [0, 1, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_array_equal(acc, [1.0, 1.0])


def test_val_with_repeated_far_values_hand_checked():
    # 2 folds of 2200 pairs; training fold: 200 same + 2000 diff.
    def fold(same_d: list[float], diff_close: int) -> tuple[list[float], list[bool]]:
        n_same = 200
        sd = (same_d * (n_same // len(same_d)))[:n_same]
        # 3.9995 is beyond the last threshold (3.999).
        dd = [1.0005] * diff_close + [3.9995] * (2000 - diff_close)
        return sd + dd, [True] * n_same + [False] * 2000

    # FAR jumps 0 -> 3/2000 between t=1.000 and t=1.001: interpolated threshold
    # 1.000 * 1/3 + 1.001 * 2/3 = 1.000667 accepts 1.0003 but not 1.0008.
    d0, s0 = fold([1.0003, 1.0008], diff_close=3)
    d1, s1 = fold([1.0003, 1.0008], diff_close=3)
    val, val_std, far = calculate_val(
        np.arange(0, 4, 0.001), np.array(d0 + d1), np.array(s0 + s1), 1e-3, nrof_folds=2
    )
    assert val == pytest.approx(0.5) and val_std == 0.0
    assert far == pytest.approx(3 / 2000)

    # FAR exactly 2/2000 = 1e-3 from t=1.001 on: threshold 1.001 accepts both.
    d0, s0 = fold([1.0003, 1.0008], diff_close=2)
    val, _, far = calculate_val(
        np.arange(0, 4, 0.001), np.array(d0 + d0), np.array(s0 + s0), 1e-3, nrof_folds=2
    )
    assert val == pytest.approx(1.0) and far == pytest.approx(1e-3)

    # Never reaching the target: threshold 0, nothing accepted.
    d0, s0 = fold([1.0003], diff_close=0)
    val, _, far = calculate_val(
        np.arange(0, 4, 0.001), np.array(d0 + d0), np.array(s0 + s0), 1e-3, nrof_folds=2
    )
    assert val == 0.0 and far == 0.0


def test_threshold_at_far_matches_scipy_without_repeats():
    interpolate = pytest.importorskip("scipy.interpolate")
    rng = np.random.default_rng(1)
    thresholds = np.arange(0, 4, 0.001)[:50]
    far = np.sort(rng.uniform(0, 0.01, 50))
    for target in (far[0], 1e-3, 5e-3, far[20], far[-1]):
        expected = float(interpolate.interp1d(far, thresholds, kind="slinear")(target))
        assert threshold_at_far(thresholds, far, target) == pytest.approx(expected, abs=1e-12)
    assert threshold_at_far(thresholds, far, 1.0) == 0.0
    # Repeats: bracket is (last below, first at-or-above).
    far_rep = np.array([0, 0, 0, 0.002, 0.002, 0.004])
    t = np.arange(6) * 0.1
    assert threshold_at_far(t, far_rep, 1e-3) == pytest.approx(0.25)
    assert threshold_at_far(t, far_rep, 0.002) == pytest.approx(0.3)


# ---------------------------------------------------------------- protocol: vs reference


def _reference_evaluate(embeddings, actual_issame, nrof_folds=10):
    """Straightforward re-statement of the community reference, with sklearn folds.

    Only the VAL interpolation differs: scipy's interp1d cannot take repeated FAR
    values, so it is given the (last threshold below, first threshold at-or-above
    each FAR value) points, which is the curve the reference means.
    """
    KFold = pytest.importorskip("sklearn.model_selection").KFold
    interpolate = pytest.importorskip("scipy.interpolate")
    emb1, emb2 = embeddings[0::2], embeddings[1::2]
    actual_issame = np.asarray(actual_issame)
    dist = np.sum(np.square(np.subtract(emb1, emb2)), 1)
    indices = np.arange(len(actual_issame))
    kf = KFold(n_splits=nrof_folds, shuffle=False)

    def acc_at(t, d, s):
        p = np.less(d, t)
        tp = np.sum(p & s)
        fp = np.sum(p & ~s)
        tn = np.sum(~p & ~s)
        fn = np.sum(~p & s)
        tpr = 0 if tp + fn == 0 else tp / (tp + fn)
        fpr = 0 if fp + tn == 0 else fp / (fp + tn)
        return tpr, fpr, (tp + tn) / d.size

    thr = np.arange(0, 4, 0.01)
    tprs = np.zeros((nrof_folds, thr.size))
    fprs = np.zeros((nrof_folds, thr.size))
    accuracy = np.zeros(nrof_folds)
    for f, (tr, te) in enumerate(kf.split(indices)):
        acc_train = [acc_at(t, dist[tr], actual_issame[tr])[2] for t in thr]
        best = int(np.argmax(acc_train))
        for j, t in enumerate(thr):
            tprs[f, j], fprs[f, j], _ = acc_at(t, dist[te], actual_issame[te])
        accuracy[f] = acc_at(thr[best], dist[te], actual_issame[te])[2]

    def val_far(t, d, s):
        p = np.less(d, t)
        return np.sum(p & s) / np.sum(s), np.sum(p & ~s) / np.sum(~s)

    thr = np.arange(0, 4, 0.001)
    val = np.zeros(nrof_folds)
    far = np.zeros(nrof_folds)
    for f, (tr, te) in enumerate(kf.split(indices)):
        far_train = np.array([val_far(t, dist[tr], actual_issame[tr])[1] for t in thr])
        if np.max(far_train) >= 1e-3:
            xs, ys = [], []
            for v in np.unique(far_train):
                where = np.nonzero(far_train == v)[0]
                xs.append(v)
                ys.append(thr[where[-1]] if v < 1e-3 else thr[where[0]])
            threshold = interpolate.interp1d(xs, ys, kind="slinear")(1e-3)
        else:
            threshold = 0.0
        val[f], far[f] = val_far(threshold, dist[te], actual_issame[te])
    return tprs.mean(0), fprs.mean(0), accuracy, np.mean(val), np.std(val), np.mean(far)


@pytest.mark.parametrize("seed,n_pairs,noise", [(0, 600, 0.9), (1, 403, 1.3), (2, 1200, 0.5)])
def test_evaluate_matches_reference(seed, n_pairs, noise):
    rng = np.random.default_rng(seed)
    same = rng.random(n_pairs) < 0.5
    a = rng.normal(size=(n_pairs, 16)).astype(np.float32)
    b = rng.normal(size=(n_pairs, 16)).astype(np.float32)
    b[same] = a[same] + noise * rng.normal(size=(int(same.sum()), 16)).astype(np.float32)
    emb = np.empty((2 * n_pairs, 16), np.float32)
    emb[0::2], emb[1::2] = a, b
    emb = l2_normalize(emb)
    ours = evaluate(emb, same)
    ref = _reference_evaluate(emb, same)
    for o, r in zip(ours[:3], ref[:3], strict=True):
        np.testing.assert_array_equal(o, r)
    assert ours[3] == pytest.approx(ref[3], abs=1e-12)
    assert ours[4] == pytest.approx(ref[4], abs=1e-12)
    assert ours[5] == pytest.approx(ref[5], abs=1e-12)
    assert 0.0 < ours[3] < 1.0  # the VAL branch was really exercised


def test_l2_normalize_is_sklearn_normalize_bitwise():
    preprocessing = pytest.importorskip("sklearn.preprocessing")
    x = np.random.default_rng(4).normal(size=(300, 512)).astype(np.float32) * 20
    x[3] = 0
    ours = l2_normalize(x)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, preprocessing.normalize(x))


def test_evaluate_rejects_bad_shapes():
    with pytest.raises(ValueError, match="len\\(issame\\) = 3"):
        evaluate(np.zeros((4, 2)), [True, False, True])


def test_summarize_flip_and_xnorm():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(40, 8)).astype(np.float32)
    emb_flip = rng.normal(size=(40, 8)).astype(np.float32)
    same = rng.random(20) < 0.5
    r = summarize(emb, emb_flip, same)
    norms = np.r_[np.linalg.norm(emb, axis=1), np.linalg.norm(emb_flip, axis=1)]
    assert r["xnorm"] == pytest.approx(float(norms.mean()), rel=1e-6)
    acc = evaluate(l2_normalize(emb + emb_flip), same)[2]
    assert r["accuracy"] == pytest.approx(acc.mean()) and r["num_pairs"] == 20


# ---------------------------------------------------------------- extraction


class TinyNet(nn.Module):
    """A small deterministic stand-in backbone: (B,3,H,W) -> (B,8), with BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 8)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            self.bn.running_mean.uniform_(-0.1, 0.1, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


def _uint8_images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def test_extraction_flip_and_batching():
    model = TinyNet().eval()
    images = _uint8_images(10, 0)
    emb, emb_flip = extract_embeddings(module_embedder(model), images, batch_size=3)
    x = ((images.float() / 255) - 0.5) / 0.5
    with torch.no_grad():
        np.testing.assert_allclose(emb, model(x).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(emb_flip, model(x.flip(3)).numpy(), rtol=1e-5, atol=1e-6)


def test_verify_targets_restores_train_mode():
    model = TinyNet().train()
    images = _uint8_images(40, 1)
    ps = PairSet("t", images, np.array([True, False] * 10))
    before = model.bn.running_mean.clone()
    out = verify_targets(model, [ps], batch_size=4)
    assert model.training and torch.equal(before, model.bn.running_mean)
    assert set(out) == {"t"} and set(out["t"]) >= {"accuracy", "val", "xnorm"}


def test_rank_slices_cover_everything():
    for n in (0, 1, 7, 10):
        for world in (1, 2, 3, 4):
            spans = [rank_slice(n, r, world) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))


def _shared_extraction(rank: int, world_size: int) -> list:
    model = TinyNet().eval()
    out = []
    for n, seed in ((11, 0), (1, 1), (world_size * 2, 2)):
        emb, emb_flip = extract_embeddings(module_embedder(model), _uint8_images(n, seed), 4)
        out.append((emb, emb_flip))
    targets = {"a": PairSet("a", _uint8_images(40, 3), np.array([True, False] * 10))}
    out.append(verify_targets(model, targets, batch_size=2))
    return out


def test_rank_shared_extraction_equals_single_process():
    model = TinyNet().eval()
    expected = []
    for n, seed in ((11, 0), (1, 1)):
        expected.append(extract_embeddings(module_embedder(model), _uint8_images(n, seed), 4))
    targets = {"a": PairSet("a", _uint8_images(40, 3), np.array([True, False] * 10))}
    expected_verify = verify_targets(model, targets, batch_size=5)
    for world in (2,):  # 11 and 1 images: uneven and empty slices
        results = run_ranks(_shared_extraction, world)
        for rank_out in results:
            for (emb, flip), (e_emb, e_flip) in zip(rank_out[:2], expected, strict=True):
                np.testing.assert_allclose(emb, e_emb, rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(flip, e_flip, rtol=1e-5, atol=1e-6)
            assert rank_out[2][0].shape == (world * 2, 8)
            got = rank_out[3]["a"]
            for key, value in expected_verify["a"].items():
                assert got[key] == pytest.approx(value, rel=1e-5)
