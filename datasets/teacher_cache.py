"""Cached teacher embeddings: a teacher's embedding of every record of a training set,
computed once (``python -m tools.teacher_embed``) and read back by the loader, so that
distillation costs no teacher forward per step.

A cache directory holds Arrow IPC shards ``embeddings-00000.arrow``, ... with the
columns ``index: int64`` (the record's index in the dataset, as the loader samples it)
and ``embedding: fixed_size_list<float32>[D]``, rows in index order, and the manifest
``teacher_cache.json``:

* ``format``: :data:`FORMAT`;
* ``teacher``: the teacher's file name, ``teacher_sha256`` (SHA-256 of its bytes),
  ``teacher_network`` and ``embedding_size`` ``D``;
* ``flip``: whether each embedding is the mean of the image's and its mirror's;
* ``dataset``: :func:`dataset_signature` of the data it was computed on (record count,
  SHA-256 of the labels in record order, the data files' names and sizes);
* ``shards``: each shard's name and row count.

:meth:`TeacherCache.open` checks all of it (and every shard's schema and index column)
and :meth:`TeacherCache.check_matches` refuses a cache of another dataset, another
record count or another teacher, naming the field and both values. Rows are served
from the memory-mapped shards: :meth:`TeacherCache.lookup` copies only the ``(b, D)``
rows of a batch, so memory stays bounded whatever the dataset's size.

The embedding of a record is that of its unaugmented image (the dataset's decode,
no random flip, no on-device augmentation): with augmentations on, the student sees an
augmented image and the teacher's target is the clean one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_path, write_json
from datasets.dataset import FaceDataset
from datasets.errors import DataError
from datasets.loader import data_files

FORMAT = "teacher-embeddings/1"
MANIFEST = "teacher_cache.json"
SHARD_ROWS = 65_536
_MANIFEST_MAX_BYTES = 16 << 20


class TeacherCacheError(DataError):
    """A cache directory that is malformed, incomplete, or not for this dataset or
    teacher (the message names the file and the mismatch)."""


def _pa() -> Any:
    import pyarrow as pa

    return pa


def shard_name(i: int) -> str:
    return f"embeddings-{i:05d}.arrow"


def cache_files(records: int, shard_rows: int = SHARD_ROWS) -> list[str]:
    """The files of a cache of ``records`` rows (for the output directory's records)."""
    return [shard_name(k) for k in range(len(shard_ranges(records, shard_rows)))] + [MANIFEST]


def labels_sha256(labels: np.ndarray) -> str:
    """SHA-256 of the labels as little-endian int64, in record order."""
    return hashlib.sha256(np.ascontiguousarray(labels, dtype="<i8").tobytes()).hexdigest()


def dataset_signature(dataset: FaceDataset) -> dict[str, Any]:
    """What identifies the records a cache was computed on: their count, the SHA-256
    of their labels in record order, and the data files' names and sizes (not their
    bytes: hashing a training set of hundreds of GB would cost more than the cache)."""
    files = [{"name": p.name, "size": p.stat().st_size} for p in data_files(dataset)]
    return {
        "records": len(dataset),
        "labels_sha256": labels_sha256(dataset.labels()),
        "files": files,
    }


def shard_ranges(records: int, shard_rows: int = SHARD_ROWS) -> list[tuple[int, int]]:
    """The ``[start, stop)`` record ranges of a cache's shards, in order (one empty
    shard for no records)."""
    if records == 0:
        return [(0, 0)]
    return [(lo, min(lo + shard_rows, records)) for lo in range(0, records, shard_rows)]


def write_shard(out: str | os.PathLike[str], k: int, start: int, rows: np.ndarray) -> None:
    """Write shard ``k``: the ``(n, D)`` embeddings of records ``start .. start + n - 1``
    (atomically; a cache's shards may be written by several processes at once).

    Raises:
        TeacherCacheError: a row is not finite (naming its record).
    """
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2:
        raise ValueError(f"expected (n, D) embeddings, got {tuple(rows.shape)}")
    finite = np.isfinite(rows).all(axis=1)
    if not finite.all():
        bad = start + int(np.argmin(finite))
        raise TeacherCacheError(
            f"the teacher's embedding of record {bad} is not finite (NaN or infinite); no "
            "cache is written from a teacher that produces such values",
            key=bad,
        )
    pa = _pa()
    n, dim = rows.shape
    table = pa.table(
        {
            "index": pa.array(np.arange(start, start + n, dtype=np.int64)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), dim),
        }
    )
    with atomic_path(Path(out) / shard_name(k)) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)


def write_manifest(
    out: str | os.PathLike[str],
    facts: dict[str, Any],
    embedding_size: int,
    shard_rows: int = SHARD_ROWS,
) -> dict[str, Any]:
    """Write the manifest, the cache's last file, once every shard is in place.

    Args:
        facts: ``teacher``, ``teacher_sha256``, ``teacher_network``, ``flip`` and
            ``dataset`` (:func:`dataset_signature`; its ``records`` sizes the shards).
    """
    ranges = shard_ranges(facts["dataset"]["records"], shard_rows)
    manifest = {
        "format": FORMAT,
        **facts,
        "embedding_size": embedding_size,
        "shards": [{"name": shard_name(k), "rows": hi - lo} for k, (lo, hi) in enumerate(ranges)],
    }
    write_json(Path(out) / MANIFEST, manifest, sort_keys=False)
    return manifest


def write_cache(
    out: str | os.PathLike[str],
    rows: np.ndarray,
    facts: dict[str, Any],
    shard_rows: int = SHARD_ROWS,
) -> dict[str, Any]:
    """A whole cache from the ``(N, D)`` embeddings in memory: shards, then manifest."""
    for k, (lo, hi) in enumerate(shard_ranges(len(rows), shard_rows)):
        write_shard(out, k, lo, rows[lo:hi])
    return write_manifest(out, facts, rows.shape[1], shard_rows)


class TeacherCache:
    """A verified cache directory, its shards memory-mapped (see the module docstring).

    Use :meth:`open`; :attr:`manifest` is the manifest, :attr:`embedding_size` ``D``.
    """

    def __init__(self, directory: Path, manifest: dict[str, Any], arrays: list[np.ndarray]):
        self.directory = directory
        self.manifest = manifest
        self.embedding_size = int(manifest["embedding_size"])
        self._arrays = arrays  # (rows_k, D) float32 views of the mapped shards
        self._starts = np.cumsum([0] + [len(a) for a in arrays[:-1]], dtype=np.int64)
        self.records = int(sum(len(a) for a in arrays))

    @classmethod
    def open(cls, directory: str | os.PathLike[str], option: str = "distill.cache") -> TeacherCache:
        """Read and check ``directory``'s manifest and shards.

        Raises:
            TeacherCacheError: no manifest (not a cache, or one still being written), a
                manifest of another format or with missing fields, a shard missing or of
                another schema, row count or index range (each names the file).
        """
        root = Path(directory)
        where = root / MANIFEST
        if not root.is_dir():
            raise TeacherCacheError(f"{option}: {str(root)!r} is not a directory", path=root)
        manifest = _read_manifest(where)
        if manifest.get("format") != FORMAT:
            raise TeacherCacheError(
                f"{where}: format {manifest.get('format')!r}, expected {FORMAT!r}", path=where
            )
        for key, kind in (
            ("teacher_sha256", str),
            ("embedding_size", int),
            ("dataset", dict),
            ("shards", list),
            ("flip", bool),
        ):
            if not isinstance(manifest.get(key), kind):
                raise TeacherCacheError(
                    f"{where}: {key!r} is missing or not a {kind.__name__}", path=where
                )
        size = manifest["embedding_size"]
        if size < 1:
            raise TeacherCacheError(f"{where}: embedding_size {size} is not >= 1", path=where)
        arrays: list[np.ndarray] = []
        expected_start = 0
        for entry in manifest["shards"]:
            name = entry.get("name") if isinstance(entry, dict) else None
            rows = entry.get("rows") if isinstance(entry, dict) else None
            if (
                not isinstance(name, str)
                or Path(name).name != name
                or not name.endswith(".arrow")
                or not isinstance(rows, int)
                or isinstance(rows, bool)
                or rows < 0
            ):
                raise TeacherCacheError(f"{where}: bad shard entry {entry!r}", path=where)
            array = _map_shard(root / name, size, rows, expected_start)
            arrays.append(array)
            expected_start += len(array)
        records = manifest["dataset"].get("records")
        if records != expected_start:
            raise TeacherCacheError(
                f"{where}: the shards hold {expected_start} rows but the manifest's dataset "
                f"has {records} records",
                path=where,
            )
        return cls(root, manifest, arrays)

    def check_matches(
        self, signature: dict[str, Any], teacher_sha256: str | None, option: str = "distill.cache"
    ) -> None:
        """Refuse this cache for a dataset of another ``signature`` or (when given) a
        teacher of another SHA-256, naming the field and both values."""
        mine = self.manifest["dataset"]
        where = self.directory / MANIFEST
        if mine.get("records") != signature["records"]:
            raise TeacherCacheError(
                f"{option}: {where} holds {mine.get('records')} records' embeddings but the "
                f"training data has {signature['records']} records (a cache of another "
                "dataset: rebuild it with python -m tools.teacher_embed)",
                path=where,
            )
        if mine.get("labels_sha256") != signature["labels_sha256"]:
            raise TeacherCacheError(
                f"{option}: {where} was computed on other data: labels_sha256 "
                f"{str(mine.get('labels_sha256'))[:16]}... but the training data's is "
                f"{signature['labels_sha256'][:16]}... (rebuild it with python -m "
                "tools.teacher_embed)",
                path=where,
            )
        if mine.get("files") != signature["files"]:
            raise TeacherCacheError(
                f"{option}: {where} was computed on other data files: {_files(mine.get('files'))} "
                f"but the training data is {_files(signature['files'])}",
                path=where,
            )
        if teacher_sha256 is not None and teacher_sha256 != self.manifest["teacher_sha256"]:
            raise TeacherCacheError(
                f"{option}: {where} holds the embeddings of another teacher: teacher_sha256 "
                f"{self.manifest['teacher_sha256'][:16]}... "
                f"({self.manifest.get('teacher', '?')}) but distill.teacher's is "
                f"{teacher_sha256[:16]}...",
                path=where,
            )

    def lookup(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """The ``(b, D)`` float32 embeddings of records ``indices`` (a copy)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.records):
            raise IndexError(f"record index out of [0, {self.records}) in {self.directory}")
        if len(self._arrays) == 1:
            return self._arrays[0][idx]
        out = np.empty((idx.size, self.embedding_size), dtype=np.float32)
        shard = np.searchsorted(self._starts, idx, side="right") - 1
        for k in np.unique(shard):  # a loop over the few shards a batch touches
            rows = shard == k
            out[rows] = self._arrays[k][idx[rows] - self._starts[k]]
        return out


def _files(entries: Iterable[dict[str, Any]] | None) -> str:
    return ", ".join(f"{e.get('name')} ({e.get('size')} bytes)" for e in entries or [])


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read(_MANIFEST_MAX_BYTES + 1)
    except FileNotFoundError:
        raise TeacherCacheError(
            f"{path}: no such file (not a teacher cache, or python -m tools.teacher_embed "
            "did not finish writing it)",
            path=path,
        ) from None
    try:
        if len(raw) > _MANIFEST_MAX_BYTES:
            raise ValueError("larger than 16 MiB")
        manifest = json.loads(raw.decode())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise TeacherCacheError(
            f"{path}: not a teacher-cache manifest ({exc})", path=path
        ) from None
    return manifest


def _map_shard(path: Path, size: int, rows: int, start: int) -> np.ndarray:
    """The shard's embeddings as a read-only ``(rows, size)`` float32 view of the
    memory-mapped file, after checking its schema, row count and index column."""
    pa = _pa()
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        table = reader.read_all()
    except FileNotFoundError:
        raise TeacherCacheError(f"{path}: missing shard of the teacher cache", path=path) from None
    except (OSError, pa.ArrowInvalid) as exc:
        raise TeacherCacheError(f"{path}: not an Arrow IPC file ({exc})", path=path) from None
    expected = pa.schema([("index", pa.int64()), ("embedding", pa.list_(pa.float32(), size))])
    if not table.schema.remove_metadata().equals(expected):
        raise TeacherCacheError(
            f"{path}: schema {table.schema.to_string(show_schema_metadata=False)!r}, expected "
            f"index: int64, embedding: fixed_size_list<float32>[{size}]",
            path=path,
        )
    if table.num_rows != rows:
        raise TeacherCacheError(
            f"{path}: {table.num_rows} rows, the manifest says {rows}", path=path
        )
    index = table.column("index").combine_chunks()
    embedding = table.column("embedding").combine_chunks()
    if index.null_count or embedding.null_count or embedding.values.null_count:
        raise TeacherCacheError(f"{path}: null values", path=path)
    found = index.to_numpy()
    if not np.array_equal(found, np.arange(start, start + rows, dtype=np.int64)):
        bad = int(np.argmax(found != np.arange(start, start + rows)))
        raise TeacherCacheError(
            f"{path}: row {bad} has index {int(found[bad])}, expected {start + bad} "
            "(shards hold consecutive records in order)",
            path=path,
            key=start + bad,
        )
    values = embedding.values.to_numpy(zero_copy_only=True)
    return values[embedding.offset * size : (embedding.offset + rows) * size].reshape(rows, size)
