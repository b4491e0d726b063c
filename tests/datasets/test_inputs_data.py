"""Bad training data: one DataError naming file, key and offset, also from loader workers;
``data.skip_corrupt`` with its cap; ``property``, ``.idx``, Arrow schema and manifest edges;
``rec2arrow`` reporting bad records (issue 20, items 8 and 13)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest

from common.cli import run_main
from common.dist import DistContext
from configs import Config, ConfigError
from datasets import DataError, recordio
from datasets.arrow_io import ArrowDataset, convert_to_shards
from datasets.arrow_shards import main as arrow_main
from datasets.dataset import LabelRangeError, RecordIODataset
from datasets.discovery import open_dataset
from datasets.face_layout import FaceRecWriter
from datasets.loader import FaceLoader
from trainer.build import build_loader

N_CLASSES, PER_CLASS = 4, 3  # 12 images


def _jpeg(value: int) -> bytes:
    return cv2.imencode(".jpg", np.full((112, 112, 3), value, np.uint8))[1].tobytes()


def _face_rec(root: Path, bad: dict[int, dict] | None = None) -> Path:
    """A face-layout train.rec of 12 images; ``bad[key]`` replaces that image record's
    ``label`` and/or ``payload``."""
    root.mkdir(parents=True, exist_ok=True)
    w = FaceRecWriter(root)
    for c in range(N_CLASSES):
        for j in range(PER_CLASS):
            w.add(c, _jpeg(40 * c + 10 * j))
    w.close()
    if bad:
        src = recordio.IndexedRecordIO(root / "train.idx", root / "train.rec", "r")
        records = [(k, src.read_idx(k)) for k in src.keys]
        out = recordio.IndexedRecordIO(root / "train.idx", root / "train.rec", "w")
        for key, raw in records:
            if key in bad:
                header, payload = recordio.unpack(raw)
                header = header._replace(label=bad[key].get("label", header.label))
                raw = recordio.pack(header, bad[key].get("payload", payload))
            out.write_idx(key, raw)
        out.close()
    return root / "train.rec"


def _offset(root: Path, key: int) -> int:
    return recordio.IndexedRecordIO(root / "train.idx", root / "train.rec", "r").idx[key]


def _all_batches(ds, num_workers: int) -> FaceLoader:
    loader = FaceLoader(ds, batch_size=4, rank=0, world_size=1, num_workers=num_workers)
    loader.set_epoch(0)
    for _ in loader:
        pass
    return loader


# ------------------------------------------------------------ one exception, one line


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_jpeg_in_a_worker_reaches_the_main_process_as_one_line(tmp_path, num_workers):
    _face_rec(tmp_path, {5: {"payload": b"\xff\xd8 not a jpeg"}})
    off = _offset(tmp_path, 5)
    with pytest.raises(DataError) as info:
        _all_batches(open_dataset(tmp_path), num_workers)
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg and "DataLoader worker" not in msg
    assert msg.startswith(f"{tmp_path / 'train.rec'} key 5 at byte offset {off}: ")
    assert "cannot decode" in msg
    assert (info.value.key, info.value.offset) == (5, off)
    assert info.value.path == str(tmp_path / "train.rec")
    assert pickle.loads(pickle.dumps(info.value)).key == 5  # crosses process boundaries


@pytest.mark.parametrize(
    ("label", "why"),
    [
        (9.0, r"label 9 is outside \[0, num_classes=4\)"),
        (float("nan"), "label nan is not an integer"),
        (2.5, "label 2.5 is not an integer"),
    ],
)
def test_bad_labels_name_the_record_also_from_workers(tmp_path, label, why):
    _face_rec(tmp_path, {7: {"label": label}})
    off = _offset(tmp_path, 7)
    with pytest.raises(LabelRangeError, match=rf"train\.rec key 7 at byte offset {off}: {why}"):
        _all_batches(open_dataset(tmp_path), 2)
    # never skipped, even with skip_corrupt
    ds = open_dataset(tmp_path, skip_corrupt=True, max_skipped_fraction=0.5)
    with pytest.raises(LabelRangeError, match="key 7"):
        _all_batches(ds, 0)


def _rewrite_idx(root: Path, key: int, offset: int) -> None:
    idx = root / "train.idx"
    lines = [
        f"{key}\t{offset}" if line.split("\t")[0] == str(key) else line
        for line in idx.read_text().splitlines()
    ]
    idx.write_text("\n".join(lines) + "\n")


def test_negative_idx_offset_is_refused_at_open(tmp_path):
    _face_rec(tmp_path)
    _rewrite_idx(tmp_path, 3, -40)
    with pytest.raises(DataError, match=r"train\.idx line 3: key 3 at byte offset -40: .*negative"):
        open_dataset(tmp_path)


def test_idx_offset_past_the_end_is_refused_at_open(tmp_path):
    rec = _face_rec(tmp_path)
    size = rec.stat().st_size
    _rewrite_idx(tmp_path, 3, size + 8)
    with pytest.raises(DataError, match=rf"train\.idx: key 3 at byte offset {size + 8} points"):
        open_dataset(tmp_path)


def test_idx_offset_into_the_middle_of_a_record_names_key_and_offset(tmp_path):
    _face_rec(tmp_path)
    off = _offset(tmp_path, 4) + 12  # inside record 4: no magic word there
    _rewrite_idx(tmp_path, 4, off)
    with pytest.raises(DataError, match=rf"train\.rec key 4.*bad magic word.*offset {off}") as info:
        _all_batches(open_dataset(tmp_path), 2)
    assert "\n" not in str(info.value) and info.value.offset == off
    # the same record is skippable as corrupt
    ds = open_dataset(tmp_path, skip_corrupt=True, max_skipped_fraction=0.2)
    assert _all_batches(ds, 0).dataset.num_skipped >= 1


# ------------------------------------------------------------ skip_corrupt and its cap


def test_skip_corrupt_counts_logs_and_stops_past_the_cap(tmp_path, caplog):
    _face_rec(tmp_path, {2: {"payload": b"junk"}, 8: {"payload": b"junk"}})
    ds = open_dataset(tmp_path, skip_corrupt=True, max_skipped_fraction=0.2)  # 2.4 of 12
    assert _all_batches(ds, 0).dataset.num_skipped == 2
    assert "key 2" in caplog.text and "key 8" in caplog.text
    ds = open_dataset(tmp_path, skip_corrupt=True, max_skipped_fraction=0.1)  # 1.2 of 12
    with pytest.raises(
        DataError,
        match=r"key \d+ at byte offset \d+: .*2 distinct corrupt "
        r"samples skipped by this loader, .*max_skipped_fraction=0\.1 of the 12 images",
    ) as info:
        _all_batches(ds, 2)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"max_skipped_fraction.*fraction in"):
        open_dataset(tmp_path, skip_corrupt=True, max_skipped_fraction=1.0)


def _cfg(root: Path, *overrides: str) -> Config:
    from configs import apply_overrides

    cfg = Config()
    base = [
        f"data.root={root}",
        f"data.num_classes={N_CLASSES}",
        f"data.num_images={N_CLASSES * PER_CLASS}",
        "data.batch_size=4",
        "data.num_workers=0",
        "eval.targets=[]",
    ]
    return apply_overrides(cfg, [*base, *overrides])


def test_skip_corrupt_config_keys_reach_the_dataset(tmp_path):
    _face_rec(tmp_path, {2: {"payload": b"junk"}})
    loader = build_loader(_cfg(tmp_path), DistContext())
    with pytest.raises(DataError, match="key 2"):
        loader.set_epoch(0)
        list(loader)
    cfg = _cfg(tmp_path, "data.skip_corrupt=true", "data.max_skipped_fraction=0.1")
    loader = build_loader(cfg, DistContext())
    loader.set_epoch(0)
    assert len(list(loader)) == 3
    assert loader.dataset.skip_corrupt and loader.dataset.max_skipped_fraction == 0.1
    with pytest.raises(ConfigError, match=r"data\.max_skipped_fraction: must be a fraction"):
        _cfg(tmp_path, "data.max_skipped_fraction=1.5")


def test_recordio_open_errors_are_data_errors_not_num_classes(tmp_path):
    rec = _face_rec(tmp_path)
    size = rec.stat().st_size
    _rewrite_idx(tmp_path, 0, size + 4)  # the header record
    with pytest.raises(DataError, match=r"train\.idx: key 0 at byte offset") as info:
        build_loader(_cfg(tmp_path), DistContext())
    assert not isinstance(info.value, ConfigError)
    assert "data.num_classes" not in str(info.value)
    (tmp_path / "train.idx").unlink()
    with pytest.raises(DataError, match=r"train\.idx .*does not exist"):
        build_loader(_cfg(tmp_path), DistContext())


# ------------------------------------------------------------ property file


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\x00\xff\xfe garbage", "not a text file"),
        (b"4,112", "expected 'num_classes,height,width'"),
        (b"0,112,112", "num_classes, height and width must be positive"),
    ],
)
def test_garbage_property_file_is_named(tmp_path, content, why):
    _face_rec(tmp_path)
    (tmp_path / "property").write_bytes(content)
    with pytest.raises(DataError, match=rf"{tmp_path / 'property'}: {why}"):
        RecordIODataset(tmp_path / "train.rec")


# ------------------------------------------------------------ Arrow shards


@pytest.fixture()
def shards(tmp_path) -> Path:
    _face_rec(tmp_path / "rec")
    convert_to_shards(
        RecordIODataset(tmp_path / "rec" / "train.rec"),
        tmp_path / "arrow",
        shard_size=5,
        progress=False,
    )
    return tmp_path / "arrow"


def _rewrite_shard(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)


def _table(path: Path) -> pa.Table:
    return pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()  # not mapped


def test_arrow_large_binary_images_are_read(shards):
    plain = ArrowDataset(shards)
    expected = [(bytes(plain._load(i)[0]), plain._load(i)[1]) for i in range(len(plain))]
    for f in sorted(shards.glob("*.arrow")):
        t = _table(f)
        t = t.set_column(1, "image", t.column("image").cast(pa.large_binary()))
        _rewrite_shard(f, t)
    ds = ArrowDataset(shards)
    assert [(bytes(ds._load(i)[0]), ds._load(i)[1]) for i in range(len(ds))] == expected
    assert ds[0][0].shape == (3, 112, 112)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda t: t.rename_columns(["lbl", "image", "key"]), r"needs exactly one column 'label'"),
        (
            lambda t: t.set_column(0, "label", t.column("label").cast(pa.float32())),
            r"column 'label' is float, expected an integer type",
        ),
        (
            lambda t: t.set_column(1, "image", pa.array(["x"] * t.num_rows, pa.string())),
            r"column 'image' is string, expected binary or large_binary",
        ),
        (lambda t: t.drop_columns(["key"]), r"needs exactly one column 'key'"),
    ],
)
def test_arrow_schema_is_checked_naming_the_shard(shards, change, why):
    f = shards / "shard-00001.arrow"
    _rewrite_shard(f, change(_table(f)))
    with pytest.raises(DataError, match=rf"shard-00001\.arrow: {why}"):
        ArrowDataset(shards)


def test_arrow_null_labels_are_refused(shards):
    f = shards / "shard-00000.arrow"
    t = _table(f)
    labels = pa.array([None, *t.column("label").to_pylist()[1:]], pa.int64())
    _rewrite_shard(f, t.set_column(0, "label", labels))
    with pytest.raises(DataError, match=r"shard-00000\.arrow batch 0: column 'label' has 1 null"):
        ArrowDataset(shards)


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda m: m.update(num_classes=0), "num_classes must be a positive integer"),
        (lambda m: m.update(num_classes="4"), "num_classes must be a positive integer"),
        (lambda m: m["shards"][0].update(file="../../etc/passwd"), r"shards\[0\]\.file must be"),
        (lambda m: m["shards"][1].update(rows=-1), r"shards\[1\]\.rows must be"),
        (lambda m: m.update(num_images=99), "num_images=99 but the shards' rows add up to 12"),
        (lambda m: m.update(shards=[]), "shards must be a non-empty list"),
    ],
)
def test_arrow_manifest_is_checked_naming_it(shards, edit, why):
    path = shards / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))
    with pytest.raises(DataError, match=rf"manifest\.json: {why}"):
        ArrowDataset(shards)


def test_arrow_manifest_garbage_and_wrong_row_count(shards):
    path = shards / "manifest.json"
    m = json.loads(path.read_text())
    m["shards"][0]["rows"] += 1
    m["num_images"] += 1
    path.write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"shard-00000\.arrow: holds 5 rows, .*says 6"):
        ArrowDataset(shards)
    path.write_text('{"num_classes": 4,\n "shards": [}')
    with pytest.raises(DataError, match=r"manifest\.json line 2 column 13: not a JSON manifest"):
        ArrowDataset(shards)


def test_arrow_manifest_class_count_must_cover_the_labels(shards):
    path = shards / "manifest.json"
    m = json.loads(path.read_text())
    m["num_classes"] = 3  # labels go up to 3
    path.write_text(json.dumps(m))
    with pytest.raises(
        LabelRangeError,
        match=r"shard-00001\.arrow batch 0 row \d+ \(source key \d+\): label 3 is outside "
        r"\[0, num_classes=3\) of .*manifest\.json",
    ):
        ArrowDataset(shards)


def test_rec2arrow_reports_bad_labels_and_undecodable_images(tmp_path, capsys):
    rec = _face_rec(tmp_path / "rec", {4: {"payload": b"junk"}, 10: {"label": 9.0}})
    off4 = _offset(tmp_path / "rec", 4)
    assert run_main(arrow_main, ["rec2arrow", str(rec), str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert f"error: {rec} key 4 at byte offset {off4}: OpenCV cannot decode 4 bytes" in err
    assert "--skip-bad" in err
    assert not (tmp_path / "a" / "manifest.json").exists()
    assert arrow_main(["rec2arrow", str(rec), str(tmp_path / "b"), "--skip-bad"]) == 0
    err = capsys.readouterr().err
    assert "skipping bad record" in err and "key 4" in err and "key 10" in err
    assert "label 9 is outside [0, num_classes=4)" in err
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["num_images"] == 10 and [s["key"] for s in m["skipped"]] == [4, 10]
    assert len(ArrowDataset(tmp_path / "b")) == 10
