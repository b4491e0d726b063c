"""RecordIO reader/writer against MXNet 1.9.1 golden files, and bad-input errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from datasets import recordio
from datasets.dataset import LabelRangeError, RecordIODataset
from datasets.face_layout import FaceRecWriter, inspect_layout
from datasets.transforms import ImageDecodeError

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "recordio"
needs_golden = pytest.mark.skipif(
    not (GOLDEN / "expected.json").is_file(),
    reason=f"golden RecordIO files not found at {GOLDEN} (shared/ must sit beside the clone)",
)


def _expected() -> dict:
    return json.loads((GOLDEN / "expected.json").read_text())


def _open(name: str) -> recordio.IndexedRecordIO:
    return recordio.IndexedRecordIO(GOLDEN / f"{name}.idx", GOLDEN / f"{name}.rec", "r")


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@needs_golden
def test_golden_edge_raw_bytes() -> None:
    exp = _expected()["edge"]
    r = _open("edge")
    assert sorted(r.keys) == sorted(int(k) for k in exp)
    for key in r.keys:
        raw = r.read_idx(key)
        assert len(raw) == exp[str(key)]["raw_len"], key
        assert _sha(raw) == exp[str(key)]["raw_sha256"], key
    # sequential reading returns the same records in file order
    seq = list(recordio.MXRecordIO(GOLDEN / "edge.rec", "r"))
    by_offset = sorted(r.keys, key=lambda k: r.idx[k])
    assert seq == [r.read_idx(k) for k in by_offset]


@needs_golden
@pytest.mark.parametrize("name", ["faces", "im2rec"])
def test_golden_headers_and_images(name: str) -> None:
    import cv2

    exp = _expected()[name]
    records = exp["records"] if name == "faces" else exp
    r = _open(name)
    assert sorted(r.keys) == sorted(int(k) for k in records)
    for key in r.keys:
        e = records[str(key)]
        header, payload = recordio.unpack(r.read_idx(key))
        assert (header.flag, header.id, header.id2) == (e["flag"], e["id"], e["id2"]), key
        np.testing.assert_array_equal(np.asarray(header.label, np.float32), e["label"])
        assert len(payload) == e["payload_len"] and _sha(payload) == e["payload_sha256"], key
        if "shape" in e:
            _, bgr = recordio.unpack_img(r.read_idx(key))
            assert list(bgr.shape) == e["shape"]
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            np.testing.assert_allclose(rgb.reshape(-1, 3).mean(0), e["mean_rgb"], atol=0.05)


@needs_golden
@pytest.mark.parametrize("name", ["edge", "faces", "im2rec"])
def test_writer_is_byte_identical(name: str, tmp_path: Path) -> None:
    r = _open(name)
    w = recordio.IndexedRecordIO(tmp_path / "o.idx", tmp_path / "o.rec", "w")
    for key in r.keys:  # .idx order is write order
        raw = r.read_idx(key)
        if name != "edge":  # re-pack from parsed fields, as a user would
            header, payload = recordio.unpack(raw)
            raw = recordio.pack(header, payload)
        w.write_idx(key, raw)
    w.close()
    assert (tmp_path / "o.rec").read_bytes() == (GOLDEN / f"{name}.rec").read_bytes()
    assert (tmp_path / "o.idx").read_bytes() == (GOLDEN / f"{name}.idx").read_bytes()


@needs_golden
def test_golden_layouts_and_datasets() -> None:
    exp = _expected()["faces"]
    faces = inspect_layout(_open("faces"))
    assert faces.face_layout and faces.num_classes == exp["num_classes"]
    assert faces.image_keys.tolist() == list(range(1, exp["num_images"] + 1))
    ds = RecordIODataset(GOLDEN / "faces.rec", flip=False)
    assert len(ds) == exp["num_images"] and ds.num_classes == exp["num_classes"]
    img, label = ds[0]
    assert img.shape == (3, 112, 112) and img.dtype.is_floating_point
    assert -1.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert label == int(exp["records"]["1"]["label"])
    im2rec = RecordIODataset(GOLDEN / "im2rec.rec")
    assert not im2rec.face_layout and len(im2rec) == 24
    labels = {im2rec.label_of(i) for i in range(len(im2rec))}
    assert im2rec.num_classes == max(labels) + 1


def test_pack_unpack_roundtrip_and_escaping(tmp_path: Path) -> None:
    magic = recordio._MAGIC_BYTES
    payloads = [b"", magic, magic * 3, b"ab" + magic + b"cd", b"x" * 4 + magic + b"yz", b"q" * 7]
    w = recordio.IndexedRecordIO(tmp_path / "a.idx", tmp_path / "a.rec", "w")
    for i, p in enumerate(payloads):
        w.write_idx(i, p)
    w.close()
    assert (tmp_path / "a.rec").stat().st_size % 4 == 0
    r = recordio.IndexedRecordIO(tmp_path / "a.idx", tmp_path / "a.rec", "r")
    assert [r.read_idx(i) for i in range(len(payloads))] == payloads
    h, p = recordio.unpack(recordio.pack(recordio.IRHeader(0, [3, 4.5], 7, 9), b"img"))
    assert h.flag == 2 and h.label.tolist() == [3.0, 4.5] and (h.id, h.id2, p) == (7, 9, b"img")
    h, p = recordio.unpack(recordio.pack(recordio.IRHeader(5, 3.0, 7, 0), b"z"))
    assert h.flag == 0 and h.label == 3.0 and p == b"z"


# ----------------------------------------------------------------------------- bad input


def _small_face_rec(tmp_path: Path, n_classes: int = 3, per_class: int = 2) -> Path:
    import cv2

    w = FaceRecWriter(tmp_path)
    for c in range(n_classes):
        for j in range(per_class):
            img = np.full((112, 112, 3), 40 * c + 10 * j, np.uint8)
            w.add(c, cv2.imencode(".jpg", img)[1].tobytes())
    w.close()
    return tmp_path / "train.rec"


def test_bad_magic_names_file_key_offset(tmp_path: Path) -> None:
    rec = _small_face_rec(tmp_path)
    r = recordio.IndexedRecordIO(tmp_path / "train.idx", rec, "r")
    off = r.idx[2]
    data = bytearray(rec.read_bytes())
    data[off : off + 4] = b"\xde\xad\xbe\xef"
    rec.write_bytes(bytes(data))
    r = recordio.IndexedRecordIO(tmp_path / "train.idx", rec, "r")
    with pytest.raises(recordio.RecordIOError, match=rf"train\.rec key 2.*bad magic.*offset {off}"):
        r.read_idx(2)


def test_truncated_record(tmp_path: Path) -> None:
    rec = _small_face_rec(tmp_path)
    r = recordio.IndexedRecordIO(tmp_path / "train.idx", rec, "r")
    off = r.idx[6]
    rec.write_bytes(rec.read_bytes()[: off + 20])
    r = recordio.IndexedRecordIO(tmp_path / "train.idx", rec, "r")
    with pytest.raises(recordio.RecordIOError, match=rf"train\.rec key 6.*truncated.*offset {off}"):
        r.read_idx(6)
    # the header record 0 (written after the images) is now past the end: refused at open
    with pytest.raises(recordio.RecordIOError, match=r"train\.rec key 0.*beyond the end"):
        RecordIODataset(rec)


def test_idx_offset_beyond_file(tmp_path: Path) -> None:
    rec = _small_face_rec(tmp_path)
    idx = tmp_path / "train.idx"
    size = rec.stat().st_size
    lines = idx.read_text().splitlines()
    lines[2] = f"3\t{size + 64}"
    idx.write_text("\n".join(lines) + "\n")
    r = recordio.IndexedRecordIO(idx, rec, "r")
    with pytest.raises(recordio.RecordIOError, match=rf"key 3.*offset {size + 64}.*beyond"):
        r.read_idx(3)


def test_missing_idx(tmp_path: Path) -> None:
    rec = _small_face_rec(tmp_path)
    (tmp_path / "train.idx").unlink()
    with pytest.raises(FileNotFoundError, match=r"train\.idx.*does not exist"):
        RecordIODataset(rec)


def test_label_out_of_range(tmp_path: Path) -> None:
    rec = _small_face_rec(tmp_path)
    r = recordio.IndexedRecordIO(tmp_path / "train.idx", rec, "r")
    w = recordio.IndexedRecordIO(tmp_path / "bad.idx", tmp_path / "bad.rec", "w")
    for key in r.keys:
        header, payload = recordio.unpack(r.read_idx(key))
        if key == 4:
            header = header._replace(label=7.0)
        w.write_idx(key, recordio.pack(header, payload))
    w.close()
    ds = RecordIODataset(tmp_path / "bad.rec")
    assert ds.num_classes == 3
    ds[0]
    off = w.idx[4]
    with pytest.raises(LabelRangeError, match=rf"bad\.rec key 4 at byte offset {off}.*label 7"):
        ds[3]


def test_undecodable_image_raises_or_is_skipped(tmp_path: Path, caplog) -> None:
    rec = _small_face_rec(tmp_path)
    r = recordio.IndexedRecordIO(tmp_path / "train.idx", rec, "r")
    w = recordio.IndexedRecordIO(tmp_path / "bad.idx", tmp_path / "bad.rec", "w")
    for key in r.keys:
        header, payload = recordio.unpack(r.read_idx(key))
        if key == 2:
            payload = b"not a jpeg at all"
        w.write_idx(key, recordio.pack(header, payload))
    w.close()
    off = w.idx[2]
    ds = RecordIODataset(tmp_path / "bad.rec")
    with pytest.raises(ImageDecodeError, match=rf"bad\.rec key 2 at byte offset {off}.*decode"):
        ds[1]
    ds = RecordIODataset(tmp_path / "bad.rec", skip_corrupt=True)
    img, label = ds[1]  # replaced by the next sample (key 3)
    assert img.shape == (3, 112, 112) and label == 1
    assert ds.num_skipped == 1
    assert "key 2" in caplog.text


class _Huge:
    """Stands in for a 2**29-byte payload without allocating it."""

    def __len__(self) -> int:
        return 1 << 29


def test_writer_refuses_huge_payload_and_is_atomic(tmp_path: Path) -> None:
    with pytest.raises(recordio.RecordIOError, match="2\\*\\*29"):
        recordio.encode_record(_Huge())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):
        with recordio.IndexedRecordIO(tmp_path / "x.idx", tmp_path / "x.rec", "w") as w:
            w.write_idx(1, b"abc")
            raise RuntimeError("crash mid-write")
    assert not (tmp_path / "x.rec").exists() and not list(tmp_path.glob("*.tmp"))
