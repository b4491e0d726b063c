"""Arrow shards: rec -> arrow -> rec round trip (byte-identical), folders, resume, DALI rec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datasets.arrow_io import (
    ArrowDataset,
    convert_to_shards,
    read_manifest,
    shards_to_rec,
    shuffled_rec,
    split_shards,
)
from datasets.arrow_shards import main
from datasets.dataset import ImageFolderDataset, RecordIODataset
from datasets.discovery import open_dataset
from datasets.recordio import IndexedRecordIO, unpack
from datasets.synthetic import SyntheticConfig, generate

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden_recordio"  # written by MXNet 1.9.1


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("synth")
    generate(d, SyntheticConfig(5, 7, 3, 2), workers=1)
    return d


def _same_samples(a, b) -> None:
    assert len(a) == len(b) and a.num_classes == b.num_classes
    for i in range(len(a)):
        pa, la, _ = a._load(i)
        pb, lb, _ = b._load(i)
        assert la == lb and bytes(pa) == bytes(pb), i


def test_rec_arrow_rec_roundtrip(synth: Path, tmp_path: Path) -> None:
    src = RecordIODataset(synth / "train.rec")
    m = main(["rec2arrow", str(synth / "train.rec"), str(tmp_path / "sh"), "--shard-size", "10"])
    assert m == 0
    manifest = read_manifest(tmp_path / "sh")
    assert [s["rows"] for s in manifest["shards"]] == [10, 10, 10, 5]
    arrow = open_dataset(tmp_path / "sh", flip=False)
    assert isinstance(arrow, ArrowDataset)
    _same_samples(src, arrow)
    img, label = arrow[3]
    assert img.shape == (3, 112, 112) and label == 0
    assert arrow._where(12).endswith("(source key 13)")
    shards_to_rec(tmp_path / "sh", tmp_path / "back", progress=False)
    for f in ("train.rec", "train.idx", "property"):
        assert (tmp_path / "back" / f).read_bytes() == (synth / f).read_bytes(), f


def test_golden_faces_roundtrip_is_byte_identical(tmp_path: Path) -> None:
    import shutil

    # the golden directory has no property file; copy so that none is expected
    for f in ("faces.rec", "faces.idx"):
        shutil.copy(GOLDEN / f, tmp_path / f.replace("faces", "train"))
    convert_to_shards(RecordIODataset(tmp_path / "train.rec"), tmp_path / "sh", progress=False)
    shards_to_rec(tmp_path / "sh", tmp_path / "back", progress=False)
    for ext in ("rec", "idx"):
        assert (tmp_path / "back" / f"train.{ext}").read_bytes() == (
            GOLDEN / f"faces.{ext}"
        ).read_bytes()


def test_resume_keeps_finished_shards(synth: Path, tmp_path: Path) -> None:
    src = RecordIODataset(synth / "train.rec")
    convert_to_shards(src, tmp_path, shard_size=10, progress=False)
    first = tmp_path / "shard-00000.arrow"
    (tmp_path / "shard-00002.arrow").unlink()  # as if interrupted
    (tmp_path / "shard-00003.arrow").write_bytes(b"partial")  # torn write of an old tool
    mtime = first.stat().st_mtime_ns
    convert_to_shards(src, tmp_path, shard_size=10, progress=False)
    assert first.stat().st_mtime_ns == mtime
    _same_samples(src, ArrowDataset(tmp_path))


def test_image_folder_and_split(tmp_path: Path) -> None:
    import cv2

    for c, name in enumerate(["bob", "alice"]):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for j in range(3):
            img = np.full((120, 100, 3), 30 * c + 5 * j, np.uint8)
            cv2.imwrite(str(tmp_path / "imgs" / name / f"{j}.jpg"), img)
    folder = ImageFolderDataset(tmp_path / "imgs")
    with pytest.raises(ValueError, match="num_classes=3 was given"):
        open_dataset(tmp_path / "imgs", num_classes=3)
    assert folder.classes == ["alice", "bob"] and folder.num_classes == 2
    x, y = folder[0]
    assert y == 0
    assert x.shape == (3, 112, 112)  # resized
    main(["folder2arrow", str(tmp_path / "imgs"), str(tmp_path / "sh"), "--shard-size", "2"])
    arrow = ArrowDataset(tmp_path / "sh")
    _same_samples(folder, arrow)
    names = [s["file"] for s in read_manifest(tmp_path / "sh")["shards"]]
    parts = [ArrowDataset(tmp_path / "sh", shards=split_shards(names, r, 2)) for r in range(2)]
    assert sum(len(p) for p in parts) == len(arrow)


def test_shuffled_rec_for_dali(synth: Path, tmp_path: Path) -> None:
    src = RecordIODataset(synth / "train.rec")
    main(["shuffle-rec", str(synth / "train.rec"), str(tmp_path), "--seed", "1"])
    r = IndexedRecordIO(tmp_path / "train.idx", tmp_path / "train.rec", "r")
    assert r.keys == list(range(len(src)))
    seen = []
    for k in r.keys:
        h, payload = unpack(r.read_idx(k))
        p0, l0, _ = src._load(h.id)
        assert payload == p0 and int(h.label) == l0
        seen.append(h.id)
    assert sorted(seen) == list(range(len(src))) and seen != sorted(seen)
    out = RecordIODataset(tmp_path / "train.rec")
    assert not out.face_layout and out.num_classes == src.num_classes
    assert shuffled_rec(src, tmp_path / "again", seed=1, progress=False) == len(src)
    assert (tmp_path / "again" / "train.rec").read_bytes() == (tmp_path / "train.rec").read_bytes()
