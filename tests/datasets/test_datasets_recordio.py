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

# Written by MXNet 1.9.1 (see its README.md); in the repository, so no test skips.
GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden_recordio"


def _expected() -> dict:
    return json.loads((GOLDEN / "expected.json").read_text())


def _open(name: str) -> recordio.IndexedRecordIO:
    return recordio.IndexedRecordIO(GOLDEN / f"{name}.idx", GOLDEN / f"{name}.rec", "r")


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


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


# ----------------------------------------------------------------------------- bytes by hand

# Every expected byte below is written out from the format facts, not produced by the
# code under test: record = u32 magic 0xCED7230A (little endian: 0a 23 d7 ce), u32 lrec
# = cflag << 29 | length, the payload, zero padding to a multiple of 4. A payload holding
# the magic word at an aligned offset is cut there into parts (cflag 1 first, 2 middle,
# 3 last), the magic word itself dropped. IRHeader = struct "<IfQQ" (flag, label, id, id2).
MAGIC_LE = "0a23d7ce"
M = bytes.fromhex(MAGIC_LE)  # the magic word as it appears inside a payload

# IRHeader(0, 2.0, 7, 0) + b"J": flag 0, label 2.0f, id 7, id2 0, payload "J"
IMAGE_BODY = bytes.fromhex("00000000 00000040 0700000000000000 0000000000000000 4a")
# IRHeader(0, [1.0, 3.0], 1, 0), no payload (a face-layout identity record): flag 2 (two
# float32 labels follow the header), header label 0.0, id 1, id2 0, labels 1.0f 3.0f
IDENTITY_BODY = bytes.fromhex(
    "02000000 00000000 0100000000000000 0000000000000000 0000803f 00004040"
)

# (key, payload handed to write_idx, the record's bytes: hex fields, spaces ignored)
HAND_RECORDS: list[tuple[int, bytes, list[str]]] = [
    (5, b"abc", [MAGIC_LE, "03000000", "616263 00"]),  # length 3, "abc" + 1 pad
    (
        2,
        b"wxyz" + M + b"12",  # magic at offset 4: two parts, the magic dropped
        [
            MAGIC_LE, "04000020", "7778797a",  # cflag 1, length 4: "wxyz"
            MAGIC_LE, "02000060", "3132 0000",  # cflag 3, length 2: "12" + 2 pad
        ],
    ),
    (
        9,
        M + M + b"q",  # magic at offsets 0 and 4: first and middle parts are empty
        [
            MAGIC_LE, "00000020",  # cflag 1, length 0
            MAGIC_LE, "00000040",  # cflag 2, length 0
            MAGIC_LE, "01000060", "71 000000",  # cflag 3, length 1: "q" + 3 pad
        ],
    ),
    (0, b"x" + M + b"yyy", [MAGIC_LE, "08000000", "78", MAGIC_LE, "797979"]),  # offset 1: kept
    (7, IMAGE_BODY, [MAGIC_LE, "19000000", IMAGE_BODY.hex(), "000000"]),  # 25 + 3 pad
    (1, IDENTITY_BODY, [MAGIC_LE, "20000000", IDENTITY_BODY.hex()]),  # 32, no pad
    (
        3,
        b"abcd" + M,  # the magic is the last aligned word: an empty last part
        [
            MAGIC_LE, "04000020", "61626364",  # cflag 1, length 4: "abcd"
            MAGIC_LE, "00000060",  # cflag 3, length 0
        ],
    ),
]  # fmt: skip
# byte offsets: running sums of the record lengths above (12, 24, 28, 16, 36, 40, 20)
HAND_IDX = "5\t0\n2\t12\n9\t36\n0\t64\n7\t80\n1\t116\n3\t156\n"


def test_pack_matches_hand_computed_header() -> None:
    assert recordio.pack(recordio.IRHeader(0, 2.0, 7, 0), b"J") == IMAGE_BODY
    assert recordio.pack(recordio.IRHeader(0, [1.0, 3.0], 1, 0), b"") == IDENTITY_BODY
    header, payload = recordio.unpack(IDENTITY_BODY)
    assert (header.flag, header.id, header.id2, payload) == (2, 1, 0, b"")
    assert header.label.tolist() == [1.0, 3.0]


def test_writer_bytes_match_hand_computed_records(tmp_path: Path) -> None:
    w = recordio.IndexedRecordIO(tmp_path / "h.idx", tmp_path / "h.rec", "w")
    for key, payload, _ in HAND_RECORDS:
        w.write_idx(key, payload)
    w.close()
    expected = b"".join(bytes.fromhex(" ".join(fields)) for _, _, fields in HAND_RECORDS)
    assert len(expected) == 176
    assert (tmp_path / "h.rec").read_bytes() == expected
    assert (tmp_path / "h.idx").read_text() == HAND_IDX
    # and the reader undoes it: every payload back, magic words re-inserted
    r = recordio.IndexedRecordIO(tmp_path / "h.idx", tmp_path / "h.rec", "r")
    for key, payload, _ in HAND_RECORDS:
        assert r.read_idx(key) == payload, key


def test_face_writer_layout_with_empty_classes(tmp_path: Path) -> None:
    """Classes 1 and 3 have no images: their identity records are [k, k) where their
    images would have been; header, identity records and property by hand."""
    w = FaceRecWriter(tmp_path, num_classes=4)
    assert [w.add(0, b"a"), w.add(0, b"b"), w.add(2, b"c")] == [1, 2, 3]
    assert w.close() == (3, 4)
    r = recordio.IndexedRecordIO(tmp_path / "train.idx", tmp_path / "train.rec", "r")
    assert r.keys == [1, 2, 3, 0, 4, 5, 6, 7]  # images, header, identities: write order
    body = recordio.pack  # (field values below are the layout's, not derived from here)
    assert r.read_idx(2) == body(recordio.IRHeader(0, 0.0, 2, 0), b"b")
    assert r.read_idx(3) == body(recordio.IRHeader(0, 2.0, 3, 0), b"c")
    assert r.read_idx(0) == body(recordio.IRHeader(2, [4.0, 8.0], 0, 1), b"")
    ranges = {4: [1.0, 3.0], 5: [3.0, 3.0], 6: [3.0, 4.0], 7: [4.0, 4.0]}
    for key, label in ranges.items():
        assert r.read_idx(key) == body(recordio.IRHeader(2, label, key, 0), b""), key
    assert (tmp_path / "property").read_text() == "4,112,112\n"
    layout = inspect_layout(r)
    assert layout.face_layout and layout.num_classes == 4
    assert layout.image_keys.tolist() == [1, 2, 3]


def test_face_writer_refuses_unordered_or_out_of_range_labels(tmp_path: Path) -> None:
    w = FaceRecWriter(tmp_path, num_classes=3)
    w.add(1, b"a")
    with pytest.raises(ValueError, match=r"train\.rec.*non-decreasing.*got 0 after 1"):
        w.add(0, b"b")
    with pytest.raises(ValueError, match=r"label 3 is outside \[0, num_classes=3\)"):
        w.add(3, b"c")
    w.abort()
    assert not list(tmp_path.iterdir())  # nothing appears


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
    with pytest.raises(
        recordio.RecordIOError, match=r"train\.idx: key \d+ at byte offset \d+ points at or past"
    ):
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
    ds = RecordIODataset(tmp_path / "bad.rec", skip_corrupt=True, max_skipped_fraction=0.2)
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
    assert not list(tmp_path.iterdir())  # neither x.rec nor x.idx nor a temporary file


def test_idx_offsets_are_named_negative_or_past_the_end(tmp_path: Path) -> None:
    """Offset 0 of an empty ``.rec`` is past its end, not negative."""
    idx = tmp_path / "empty.idx"
    idx.write_text("0\t0\n")
    with pytest.raises(
        recordio.RecordIOError, match=r"at or past the end of the \.rec \(0 bytes\)"
    ):
        recordio.read_idx_file(idx, rec_size=0)
    idx.write_text("0\t-8\n")
    with pytest.raises(recordio.RecordIOError, match="negative"):
        recordio.read_idx_file(idx, rec_size=0)


def test_an_aborted_writer_takes_no_more_records(tmp_path: Path) -> None:
    target = tmp_path / "out.rec"
    writer = recordio.MXRecordIO(target, "w")
    writer.write(b"kept out")
    writer.abort()
    with pytest.raises(ValueError, match="not open for writing"):
        writer.write(b"late")
    assert not target.exists()
