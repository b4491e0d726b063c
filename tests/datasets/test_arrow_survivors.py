"""Arrow shards: the behaviours mutation testing found unguarded in ``datasets/arrow_io.py``.

Writing: rows go into record batches of ``_BATCH_ROWS``; a bad record stops a conversion
unless ``skip_bad`` is asked for; ``progress`` shows a bar. Reading: a directory without
``manifest.json`` and a ``num_classes`` that disagrees with it are refused naming them;
an index outside the data is refused naming it; a pickled copy (what a DataLoader worker
gets) maps the shards again and reads the same rows, labels and locations; a row that
cannot be decoded is reported with its shard and source key. Also ``shuffled_rec``'s
default seed and ``open_source`` on a folder holding ``train.rec``. Every expectation
comes from the records the test wrote, not from the code under test.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pytest

from datasets.arrow_io import (
    _BATCH_ROWS,
    ArrowDataset,
    convert_to_shards,
    open_source,
    shard_name,
    shuffled_rec,
)
from datasets.dataset import FaceDataset, RecordIODataset
from datasets.errors import DataError
from datasets.face_layout import FaceRecWriter
from datasets.recordio import IndexedRecordIO, unpack

N_CLASSES, PER_CLASS, SHARD_SIZE = 4, 3, 5  # 12 rows: shards of 5, 5 and 2 rows
KEY0 = 100  # source key of row i: KEY0 + i


def _jpeg(value: int) -> bytes:
    return cv2.imencode(".jpg", np.full((16, 16, 3), value, np.uint8))[1].tobytes()


class _Records(FaceDataset):
    """An in-memory source: ``records[i] = (encoded image, label)``, key ``KEY0 + i``."""

    def __init__(self, records: list[tuple[bytes, int]], num_classes: int = N_CLASSES) -> None:
        super().__init__(flip=False)
        self.records = records
        self.num_classes = num_classes
        self.image_keys = np.arange(KEY0, KEY0 + len(records), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, index: int) -> tuple[bytes, int, None]:
        payload, label = self.records[index]
        return payload, label, None


RECORDS = [
    (_jpeg(40 * c + 10 * j), c) for c in range(N_CLASSES) for j in range(PER_CLASS)
]  # distinct images


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("arrow") / "sh"
    convert_to_shards(_Records(RECORDS), out, shard_size=SHARD_SIZE, progress=False)
    return out


def _rows(ds: FaceDataset) -> list[tuple[bytes, int]]:
    return [(bytes(p), label) for p, label, _ in (ds._load(i) for i in range(len(ds)))]


def _batch_rows(path: Path) -> list[int]:
    with pa.memory_map(str(path), "r") as src:
        reader = pa.ipc.open_file(src)
        return [reader.get_batch(b).num_rows for b in range(reader.num_record_batches)]


def test_arrow_writer_splits_a_shard_into_record_batches(tmp_path: Path) -> None:
    n = _BATCH_ROWS + 6
    records = [(b"%d" % i, i % 3) for i in range(n)]  # not images: check=False
    convert_to_shards(_Records(records, 3), tmp_path, progress=False, check=False)
    f = tmp_path / shard_name(0)
    assert _batch_rows(f) == [_BATCH_ROWS, 6]
    ds = ArrowDataset(tmp_path)
    assert _rows(ds) == records
    assert ds._where(_BATCH_ROWS + 1) == f"{f} batch 1 row 1 (source key {KEY0 + _BATCH_ROWS + 1})"


def test_arrow_conversion_refuses_a_bad_record_by_default(tmp_path: Path) -> None:
    records = list(RECORDS)
    records[3] = (records[3][0], 9)
    with pytest.raises(
        DataError,
        match=r"_Records sample 3: label 9 is outside \[0, num_classes=4\) "
        r"\(not converted; --skip-bad",
    ):
        convert_to_shards(_Records(records), tmp_path / "a", progress=False)
    assert not (tmp_path / "a" / "manifest.json").exists()
    m = convert_to_shards(_Records(records), tmp_path / "b", progress=False, skip_bad=True)
    assert m["num_images"] == 11 and [s["key"] for s in m["skipped"]] == [3]


def test_arrow_conversion_shows_a_progress_bar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    convert_to_shards(_Records(RECORDS), tmp_path / "quiet", SHARD_SIZE, progress=False)
    assert capsys.readouterr().err == ""
    convert_to_shards(_Records(RECORDS), tmp_path / "sh", SHARD_SIZE)  # progress by default
    err = capsys.readouterr().err
    assert f"-> {tmp_path / 'sh'}" in err and "12/12" in err


def test_arrow_directory_without_manifest_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / shard_name(0)).write_bytes(b"")
    with pytest.raises(
        FileNotFoundError,
        match=rf"^{tmp_path / 'manifest.json'} does not exist \(not an Arrow shard directory\?\)",
    ):
        ArrowDataset(tmp_path)


def test_arrow_num_classes_must_match_the_manifest(shards: Path) -> None:
    with pytest.raises(ValueError, match=rf"num_classes=5 was given, {shards} holds 4"):
        ArrowDataset(shards, num_classes=5)
    assert ArrowDataset(shards, num_classes=N_CLASSES).num_classes == N_CLASSES


@pytest.mark.parametrize("index", [len(RECORDS), len(RECORDS) + 3, -1])
def test_arrow_index_outside_the_data_is_refused_naming_it(shards: Path, index: int) -> None:
    ds = ArrowDataset(shards)
    with pytest.raises(IndexError, match=rf"^index {index} outside \[0, 12\) in {shards}$"):
        ds._load(index)


def _copy(ds: ArrowDataset) -> ArrowDataset:
    """What a DataLoader worker started by spawn gets."""
    return pickle.loads(pickle.dumps(ds))


def test_arrow_dataset_pickles_for_loader_workers(shards: Path) -> None:
    copy = _copy(ArrowDataset(shards))
    assert len(copy) == len(RECORDS) and copy.num_classes == N_CLASSES
    assert _rows(copy) == RECORDS


def test_arrow_pickled_copy_reads_the_labels(shards: Path) -> None:
    copy = _copy(ArrowDataset(shards))
    np.testing.assert_array_equal(copy.labels(), [label for _, label in RECORDS])


def test_arrow_pickled_copy_names_where_a_row_lives(shards: Path) -> None:
    copy = _copy(ArrowDataset(shards))
    assert copy._where(7) == f"{shards / shard_name(1)} batch 0 row 2 (source key {KEY0 + 7})"


def test_arrow_undecodable_row_is_reported_with_its_shard_and_key(tmp_path: Path) -> None:
    records = list(RECORDS)
    records[8] = (b"junk", records[8][1])
    convert_to_shards(_Records(records), tmp_path, SHARD_SIZE, progress=False, check=False)
    ds = ArrowDataset(tmp_path)
    f = tmp_path / shard_name(1)
    with pytest.raises(DataError, match=rf"^{f} batch 0 row 3 \(source key 108\): OpenCV") as e:
        ds[8]
    assert (e.value.path, e.value.key) == (str(f), KEY0 + 8)


def _shuffled(out: Path, **kwargs: Any) -> list[tuple[int, int, bytes]]:
    shuffled_rec(_Records(RECORDS), out, progress=False, **kwargs)
    r = IndexedRecordIO(out / "train.idx", out / "train.rec", "r")
    return [(h.id, int(h.label), p) for h, p in (unpack(r.read_idx(k)) for k in r.keys)]


def test_arrow_shuffled_rec_default_seed_is_zero(tmp_path: Path) -> None:
    order = np.random.default_rng(0).permutation(len(RECORDS))
    expected = [(int(i), RECORDS[i][1], RECORDS[i][0]) for i in order]
    assert _shuffled(tmp_path / "default") == expected
    assert _shuffled(tmp_path / "seed1", seed=1) != expected  # the seed matters


def test_arrow_open_source_reads_a_folder_holding_train_rec(tmp_path: Path) -> None:
    w = FaceRecWriter(tmp_path)
    for payload, label in RECORDS:
        w.add(label, payload)
    w.close()
    ds = open_source(str(tmp_path))
    assert isinstance(ds, RecordIODataset)
    assert ds.num_classes == N_CLASSES and _rows(ds) == RECORDS


class _Keyless(_Records):
    """A source without ``image_keys`` (an image folder, say)."""

    def __init__(self, records: list[tuple[bytes, int]]) -> None:
        super().__init__(records)
        del self.image_keys


def test_arrow_rows_of_a_source_without_keys_have_key_minus_one(tmp_path: Path) -> None:
    """The documented ``key`` column: the source RecordIO key, or -1 where there is none."""
    convert_to_shards(_Keyless(RECORDS[:4]), tmp_path, progress=False)
    f = tmp_path / shard_name(0)
    with pa.memory_map(str(f), "r") as src:
        keys = pa.ipc.open_file(src).read_all().column("key").to_pylist()
    assert keys == [-1, -1, -1, -1]
    assert ArrowDataset(tmp_path)._where(2) == f"{f} batch 0 row 2 (source key -1)"


def test_arrow_conversion_refuses_a_label_equal_to_num_classes(tmp_path: Path) -> None:
    """Labels lie in ``[0, num_classes)``: ``num_classes`` itself is outside."""
    records = list(RECORDS)
    records[5] = (records[5][0], N_CLASSES)
    with pytest.raises(
        DataError, match=r"_Records sample 5: label 4 is outside \[0, num_classes=4\)"
    ):
        convert_to_shards(_Records(records), tmp_path, progress=False)
    assert not (tmp_path / "manifest.json").exists()
