"""eval.make_bin: an LFW-style .bin from your own people (issue #27, item 2).

The output is read twice: by the project's restricted reader (eval.bin_io) and by a
reader written here from the format (a trusted file: plain ``pickle.loads``, then the
format's facts checked one by one).
"""

from __future__ import annotations

import hashlib
import pickle

import cv2
import numpy as np
import pytest

from common.errors import UsageError
from eval import make_bin
from eval.bin_io import load_bin
from eval.make_bin import MakeBinError, Photo, build_bin, make_pairs

IDS = 6
PER_ID = 4


def _face(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
    return cv2.resize(small, (112, 112), interpolation=cv2.INTER_NEAREST)


def _folder(root, ids=IDS, per_id=PER_ID, duplicates=True):
    """``root/id<k>/<n>.png``; with ``duplicates``, id0 also holds a byte copy and a JPEG
    re-encoding of its first photo (near-duplicates that no pair may join)."""
    for k in range(ids):
        d = root / f"id{k}"
        d.mkdir(parents=True)
        for n in range(per_id):
            cv2.imwrite(str(d / f"{n}.png"), _face(100 * k + n))
    if duplicates:
        (root / "id0" / "copy.png").write_bytes((root / "id0" / "0.png").read_bytes())
        cv2.imwrite(str(root / "id0" / "again.jpg"), _face(0), [cv2.IMWRITE_JPEG_QUALITY, 97])
    return root


def _group(img: np.ndarray) -> bytes:
    """The same photo (original, byte copy, JPEG copy) in one group: coarse pixels."""
    return (img.astype(int) // 32).astype(np.uint8)[::8, ::8].tobytes()


def _read_plain(path):
    """A reader written from the format: (list of 2P encoded images, list of P bools)."""
    with open(path, "rb") as f:
        bins, issame = pickle.loads(f.read())  # our own file: trusted
    assert isinstance(bins, list) and isinstance(issame, list)
    assert all(type(b) is bytes for b in bins) and all(type(s) is bool for s in issame)
    assert len(bins) == 2 * len(issame)
    images = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) for b in bins]
    assert all(img is not None and img.shape == (112, 112, 3) for img in images)
    return images, issame


def _run(tmp_path, *extra, pairs=40, src=None):
    src = src or _folder(tmp_path / "people")
    out = tmp_path / "mine.bin"
    record = make_bin.main([str(src), "--out", str(out), "--pairs", str(pairs), *extra])
    return out, record


def test_output_is_read_by_both_readers_balanced_in_folds(tmp_path):
    out, record = _run(tmp_path)
    assert (record["pairs"], record["genuine"], record["impostor"]) == (40, 20, 20)
    images, issame = _read_plain(out)
    pairs = load_bin(out)
    np.testing.assert_array_equal(pairs.issame, np.array(issame))
    rgb = np.stack(images)[..., ::-1].transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(pairs.images.numpy(), rgb)
    folds = np.array(issame).reshape(10, 4)  # 10 contiguous folds, 2 genuine then 2 impostor
    assert (folds == [True, True, False, False]).all()


def test_no_photo_is_paired_with_itself_or_a_near_duplicate(tmp_path):
    src = _folder(tmp_path / "people")
    out, _ = _run(tmp_path, "--pairs", "60", pairs=60, src=src)
    images, issame = _read_plain(out)
    seen = set()
    for i in range(len(issame)):
        a, b = images[2 * i], images[2 * i + 1]
        assert not np.array_equal(a, b)
        # the JPEG copy decodes to other pixels but is the same photo
        close = np.abs(a.astype(int) - b.astype(int)).mean() < 8
        assert not close, f"pair {i} joins a photo and its near-duplicate"
        key = tuple(sorted((_group(a), _group(b))))
        assert key not in seen
        seen.add(key)
    # the source holds the duplicates: a byte copy and a JPEG re-encoding of id0/0.png
    copy = (src / "id0" / "copy.png").read_bytes()
    assert (
        hashlib.sha256(copy).digest()
        == hashlib.sha256((src / "id0" / "0.png").read_bytes()).digest()
    )


def test_same_seed_same_file_other_seed_other_pairs(tmp_path):
    src = _folder(tmp_path / "people")
    photos = [Photo(k, (src / f"id{k}" / f"{n}.png").read_bytes(), f"{k}/{n}")
              for k in range(IDS) for n in range(PER_ID)]  # fmt: skip
    a, _ = build_bin(photos, 20, seed=3)
    b, _ = build_bin(photos, 20, seed=3)
    c, _ = build_bin(photos, 20, seed=4)
    assert a == b and a != c


def test_genuine_pairs_share_an_identity_and_impostors_do_not(tmp_path):
    labels = np.repeat(np.arange(5), 3)
    groups = np.arange(15)
    pairs = make_pairs(labels, groups, 20, 10, seed=0)
    for a, b, same in pairs:
        assert a != b and (labels[a] == labels[b]) == same


def test_too_few_photos_gives_the_numbers(tmp_path):
    src = _folder(tmp_path / "few", ids=3, per_id=2, duplicates=False)
    with pytest.raises(MakeBinError) as info:
        _run(tmp_path, pairs=40, src=src)
    message = str(info.value)
    assert "20 genuine" in message and "3 identities" in message and "6 photos" in message
    assert "3 distinct genuine pairs" in message
    with pytest.raises(UsageError, match="multiple of 2 x --folds 10"):
        make_pairs(np.zeros(4), np.arange(4), 30, 10, 0)


def test_refuses_to_overwrite_a_file_it_did_not_make(tmp_path, capsys):
    src = _folder(tmp_path / "people")
    out = tmp_path / "mine.bin"
    out.write_bytes(b"someone's file")
    with pytest.raises(UsageError, match="--overwrite"):
        _run(tmp_path, src=src)
    assert out.read_bytes() == b"someone's file"
    _run(tmp_path, "--overwrite", src=src)
    _run(tmp_path, "--seed", "1", src=src)  # its own file: replaced without --overwrite
    assert load_bin(out).issame.size == 40


def test_a_prepared_recordio_dataset_is_a_source(tmp_path):
    from datasets.synthetic import SyntheticConfig, generate

    generate(tmp_path / "rec", SyntheticConfig(identities=5, images_per_identity=4), workers=1)
    out, record = _run(tmp_path, pairs=20, src=tmp_path / "rec")
    assert (record["identities"], record["photos"]) == (5, 20)
    pairs = load_bin(out)
    assert pairs.issame.tolist() == [True, False] * 10
    assert pairs.images.shape == (40, 3, 112, 112)
