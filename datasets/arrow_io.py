"""Arrow IPC shards: conversion from/to RecordIO and image folders, and a memory-mapped
Dataset. The library of the ``datasets.arrow_shards`` command, which imports it after
parsing its arguments so that ``--help`` stays fast.

A shard directory holds ``shard-00000.arrow``, ``shard-00001.arrow``, ... (Arrow IPC *file*
format, columns ``label: int64``, ``image: binary`` (encoded JPEG/PNG), ``key: int64``
(source RecordIO key, or -1)) and ``manifest.json`` (shard names and row counts,
``num_classes``, ``num_images``). Rows keep the source order (class-grouped for face data).

Conversions (:func:`convert_to_shards`, :func:`shards_to_rec`, :func:`shuffled_rec`)
write their output files atomically. ``rec2arrow``/``folder2arrow``
(:func:`convert_to_shards`) are resumable: finished shards are kept (their row count is
checked) and only missing shards are written; counts are verified at the end. Every row
is checked while it is converted (label in ``[0, num_classes)`` and an integer, image
decodable): a bad row stops the conversion with a :class:`~datasets.errors.DataError`
naming the source file, key and offset, or with ``--skip-bad`` is left out, reported on
stderr and listed under ``skipped`` in the manifest.

Reading (:class:`ArrowDataset`) checks ``manifest.json`` (keys, types, shard names inside
the directory, row counts), every shard's schema (``label``/``key`` integer columns,
``image`` ``binary`` or ``large_binary``, no nulls) and that every label lies in
``[0, num_classes)``, naming the shard.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_path, write_json
from datasets.dataset import FaceDataset, ImageFolderDataset, RecordIODataset
from datasets.errors import DataError, LabelRangeError
from datasets.face_layout import FaceRecWriter, write_property
from datasets.recordio import IndexedRecordIO, IRHeader, pack
from datasets.transforms import decode_bgr

SCHEMA_FIELDS = (("label", "int64"), ("image", "binary"), ("key", "int64"))
MANIFEST = "manifest.json"
_BATCH_ROWS = 1024


def _pa():
    import pyarrow as pa

    return pa


def _schema():
    pa = _pa()
    return pa.schema([("label", pa.int64()), ("image", pa.binary()), ("key", pa.int64())])


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.arrow"


def _count_rows(path: Path) -> int:
    """Rows in a shard file, or -1 if it is not a complete Arrow IPC file."""
    pa = _pa()
    try:
        with pa.memory_map(str(path), "r") as src:
            reader = pa.ipc.open_file(src)
            return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    except (pa.ArrowInvalid, OSError):
        return -1


def _write_shard(path: Path, rows: Iterator[tuple[int, bytes, int]]) -> int:
    """Write one shard atomically; returns its row count."""
    pa = _pa()
    schema = _schema()
    n = 0
    # pyarrow opens the file by name; atomic_path renames it into place once closed
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink:
        with pa.ipc.new_file(sink, schema) as writer:
            labels: list[int] = []
            images: list[bytes] = []
            keys: list[int] = []

            def flush() -> None:
                writer.write_batch(
                    pa.record_batch(
                        [
                            pa.array(labels, pa.int64()),
                            pa.array(images, pa.binary()),
                            pa.array(keys, pa.int64()),
                        ],
                        schema=schema,
                    )
                )
                labels.clear()
                images.clear()
                keys.clear()

            for label, image, key in rows:
                labels.append(label)
                images.append(image)
                keys.append(key)
                n += 1
                if len(labels) == _BATCH_ROWS:
                    flush()
            if labels:
                flush()
    return n


def _rows(
    source: FaceDataset,
    keys: np.ndarray | None,
    lo: int,
    hi: int,
    bar: Any,
    check: bool,
    skipped: list[dict[str, Any]] | None,
) -> Iterator[tuple[int, bytes, int]]:
    for i in range(lo, hi):
        try:
            payload, label, where = source._load(i)
            _check_row(source, i, payload, label, where, decode=check)
        except DataError as exc:
            if skipped is None:
                raise DataError(
                    f"{exc} (not converted; --skip-bad leaves such records out)",
                    path=exc.path,
                    key=exc.key,
                    offset=exc.offset,
                ) from None
            skipped.append({"index": i, "key": source.sample_key(i), "error": str(exc)})
            print(f"skipping bad record: {exc}", file=sys.stderr)
        else:
            yield label, bytes(payload), int(keys[i]) if keys is not None else -1
        if bar is not None:
            bar.update(1)


def _check_row(
    source: FaceDataset, i: int, payload: Any, label: Any, where: str | None, decode: bool
) -> None:
    """Raise :class:`DataError` naming the record if its label (or, with ``decode``,
    its image) is bad."""
    if not 0 <= label < source.num_classes:
        raise LabelRangeError(
            f"{where or source._where(i)}: label {label} is outside "
            f"[0, num_classes={source.num_classes})",
            **source._location(i),
        )
    if decode and decode_bgr(payload, None) is None:
        raise DataError(
            f"{where or source._where(i)}: OpenCV cannot decode {len(payload)} bytes as an image",
            **source._location(i),
        )


def convert_to_shards(
    source: FaceDataset,
    out_dir: str | os.PathLike,
    shard_size: int = 100_000,
    progress: bool = True,
    check: bool = True,
    skip_bad: bool = False,
) -> dict[str, Any]:
    """Write every sample of ``source`` (raw encoded bytes, no re-encoding) into shards.

    Resumable: a shard file already present with the expected row count is kept.
    Every row's label (and with ``check`` its image) is verified as it is converted; a bad
    row raises :class:`DataError` naming the source record, or with ``skip_bad`` is left
    out, printed and listed under ``skipped`` in the manifest.
    Returns the manifest (also written to ``out_dir/manifest.json``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(source)
    keys = getattr(source, "image_keys", None)
    n_shards = max(1, -(-n // shard_size))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"-> {out}", unit="img", file=sys.stderr)
    shards = []
    skipped: list[dict[str, Any]] | None = [] if skip_bad else None
    try:
        for s in range(n_shards):
            lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
            path = out / shard_name(s)
            if path.is_file() and _count_rows(path) == hi - lo:
                rows = hi - lo  # finished by an earlier run
                if bar is not None:
                    bar.update(rows)
            else:
                rows = _write_shard(path, _rows(source, keys, lo, hi, bar, check, skipped))
            shards.append({"file": path.name, "rows": rows})
    finally:
        if bar is not None:
            bar.close()
    total = sum(_count_rows(out / s["file"]) for s in shards)
    expected = n - len(skipped or ())
    if total != expected:
        raise RuntimeError(f"{out}: shards hold {total} rows, expected {expected}")
    manifest = {
        "format": "partial-fc arrow shards v1",
        "columns": [name for name, _ in SCHEMA_FIELDS],
        "num_images": total,
        "num_classes": int(source.num_classes),
        "shards": shards,
    }
    if skipped:
        manifest["skipped"] = skipped
        print(f"{len(skipped)} bad records left out (listed in {out / MANIFEST})", file=sys.stderr)
    write_json(out / MANIFEST, manifest, indent=1)
    return manifest


def read_manifest(shard_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``manifest.json``; :class:`DataError` naming the file says what is wrong."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (not an Arrow shard directory?)")
    try:
        manifest = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" line {exc.lineno} column {exc.colno}" if hasattr(exc, "lineno") else ""
        msg = exc.msg if hasattr(exc, "msg") else "not UTF-8 text"
        raise DataError(f"{path}{where}: not a JSON manifest ({msg})", path=path) from None

    def bad(what: str) -> DataError:
        return DataError(f"{path}: {what}", path=path)

    if not isinstance(manifest, dict):
        raise bad(f"expected a JSON object, got {type(manifest).__name__}")
    c = manifest.get("num_classes")
    if isinstance(c, bool) or not isinstance(c, int) or c <= 0:
        raise bad(f"num_classes must be a positive integer, got {c!r}")
    entries = manifest.get("shards")
    if not isinstance(entries, list) or not entries:
        raise bad(f"shards must be a non-empty list, got {entries!r:.80}")
    for j, e in enumerate(entries):
        if not isinstance(e, dict):
            raise bad(f"shards[{j}] must be an object with 'file' and 'rows', got {e!r:.80}")
        name, rows = e.get("file"), e.get("rows")
        if not isinstance(name, str) or not name or Path(name).name != name or name in ("..", "."):
            raise bad(f"shards[{j}].file must be a file name inside the directory, got {name!r}")
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise bad(f"shards[{j}].rows must be an integer >= 0, got {rows!r}")
    n = manifest.get("num_images")
    total = sum(e["rows"] for e in entries)
    if n is not None and n != total:
        raise bad(f"num_images={n!r} but the shards' rows add up to {total}")
    return manifest


def _check_schema(f: Path, schema: Any) -> dict[str, int]:
    """Column indices of ``label``, ``image``, ``key`` after checking their types."""
    pa = _pa()
    names = list(schema.names)
    cols: dict[str, int] = {}
    for name, ok, want in (
        ("label", pa.types.is_integer, "an integer type (int64)"),
        (
            "image",
            lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t),
            "binary or large_binary",
        ),
        ("key", pa.types.is_integer, "an integer type (int64)"),
    ):
        if names.count(name) != 1:
            raise DataError(
                f"{f}: needs exactly one column {name!r} ({want}); the shard has columns {names}",
                path=f,
            )
        t = schema.field(name).type
        if not ok(t):
            raise DataError(f"{f}: column {name!r} is {t}, expected {want}", path=f)
        cols[name] = names.index(name)
    return cols


def split_shards(shards: list[str], rank: int, world_size: int) -> list[str]:
    """Shard files for one node or rank (round robin) when data is staged per node."""
    return shards[rank::world_size]


class ArrowDataset(FaceDataset):
    """Memory-mapped, zero-copy Dataset over Arrow shards (same contract as the others).

    Args:
        shard_dir: directory with ``manifest.json`` and the shards.
        shards: optional subset of shard file names (e.g. from :func:`split_shards`).

    Shards are memory-mapped lazily in each process; an image is a zero-copy slice of the
    mapped file handed straight to ``cv2.imdecode``.
    """

    def __init__(
        self, shard_dir: str | os.PathLike, shards: list[str] | None = None, **kwargs: Any
    ) -> None:
        num_classes = kwargs.pop("num_classes", None)
        super().__init__(**kwargs)
        self.shard_dir = Path(shard_dir)
        manifest = read_manifest(self.shard_dir)
        entries = manifest["shards"]
        if shards is not None:
            wanted = set(shards)
            entries = [e for e in entries if e["file"] in wanted]
        self.files = [self.shard_dir / e["file"] for e in entries]
        for f in self.files:
            if not f.is_file():
                raise FileNotFoundError(f"shard {f} listed in {MANIFEST} does not exist")
        self.num_classes = int(manifest["num_classes"])
        if num_classes is not None and num_classes != self.num_classes:
            raise ValueError(
                f"num_classes={num_classes} was given, {self.shard_dir} holds {self.num_classes}"
            )
        self._pid: int | None = None
        self._batches: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]] = []
        self._starts = np.zeros(0, np.int64)
        self._open(check=True)
        self._len = int(self._starts[-1]) if len(self._starts) else 0
        for e, f in zip(entries, self.files, strict=True):
            got = self._rows_per_file[f]
            if got != int(e["rows"]):
                raise DataError(
                    f"{f}: holds {got} rows, {self.shard_dir / MANIFEST} says {e['rows']}",
                    path=f,
                )

    def _open(self, check: bool = False) -> None:
        """Memory-map the shards (in this process); ``check``: schema, nulls, labels."""
        pa = _pa()
        batches = []
        starts = [0]
        self._rows_per_file: dict[Path, int] = {}
        for f in self.files:
            try:
                src = pa.memory_map(str(f), "r")
                reader = pa.ipc.open_file(src)
            except (pa.ArrowInvalid, OSError) as exc:
                raise DataError(f"{f}: not a readable Arrow IPC file ({exc})", path=f) from None
            cols = _check_schema(f, reader.schema)
            rows = 0
            for b in range(reader.num_record_batches):
                batch = reader.get_batch(b)
                where = f"{f} batch {b}"
                label_col, images, key_col = (
                    batch.column(cols[c]) for c in ("label", "image", "key")
                )
                if check:
                    for name, col in (("label", label_col), ("image", images), ("key", key_col)):
                        if col.null_count:
                            raise DataError(
                                f"{where}: column {name!r} has {col.null_count} null values",
                                path=f,
                            )
                _, off_buf, data_buf = images.buffers()
                off_type = np.int64 if pa.types.is_large_binary(images.type) else np.int32
                offsets = np.frombuffer(off_buf, off_type)[
                    images.offset : images.offset + len(images) + 1
                ]
                data = (
                    np.frombuffer(data_buf, np.uint8)
                    if data_buf is not None
                    else np.zeros(0, np.uint8)
                )
                labels = label_col.to_numpy(zero_copy_only=True)
                keys = key_col.to_numpy(zero_copy_only=True)
                if check and len(labels):
                    bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
                    if len(bad):
                        r = int(bad[0])
                        raise LabelRangeError(
                            f"{where} row {r} (source key {int(keys[r])}): label "
                            f"{int(labels[r])} is outside [0, num_classes={self.num_classes}) "
                            f"of {self.shard_dir / MANIFEST} ({len(bad)} such rows in this batch)",
                            path=f,
                            key=int(keys[r]),
                        )
                batches.append((labels, offsets, data, keys, where))
                starts.append(starts[-1] + batch.num_rows)
                rows += batch.num_rows
            self._rows_per_file[f] = rows
        self._batches = batches
        self._starts = np.asarray(starts, np.int64)
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_batches"] = []
        state["_pid"] = None
        return state

    def __len__(self) -> int:
        return self._len

    def labels(self) -> np.ndarray:
        """Every row's label (see :meth:`FaceDataset.labels`): the shards' ``label``
        column, in row order."""
        if self._pid != os.getpid():
            self._open()
        if not self._batches:
            return np.zeros(0, np.int64)
        return np.concatenate([np.asarray(b[0], np.int64) for b in self._batches])

    def _load(self, index: int) -> tuple[bytes, int, str]:
        if self._pid != os.getpid():
            self._open()
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} outside [0, {self._len}) in {self.shard_dir}")
        b = int(np.searchsorted(self._starts, index, side="right")) - 1
        labels, offsets, data = self._batches[b][:3]
        row = index - int(self._starts[b])
        return data[offsets[row] : offsets[row + 1]], int(labels[row]), None

    def _where(self, index: int) -> str:
        if self._pid != os.getpid():
            self._open()
        b = int(np.searchsorted(self._starts, index, side="right")) - 1
        _, _, _, keys, where = self._batches[b]
        row = index - int(self._starts[b])
        return f"{where} row {row} (source key {int(keys[row])})"

    def _location(self, index: int) -> dict[str, Any]:
        if self._pid != os.getpid():
            self._open()
        b = int(np.searchsorted(self._starts, index, side="right")) - 1
        keys, where = self._batches[b][3:]
        row = index - int(self._starts[b])
        return {"path": where.rsplit(" batch ", 1)[0], "key": int(keys[row])}


# ----------------------------------------------------------------------------- rec writers


def shards_to_rec(
    shard_dir: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True
) -> tuple[int, int]:
    """Write a face-layout ``train.rec``/``train.idx``/``property`` from Arrow shards.

    Rows are written grouped by label (stable: source order within a class), so a
    ``rec2arrow`` → ``arrow2rec`` round trip reproduces the original face-layout file.
    """

    ds = ArrowDataset(shard_dir)
    labels = ds.labels()
    order = np.argsort(labels, kind="stable")
    writer = FaceRecWriter(out_dir, num_classes=ds.num_classes)
    try:
        for i in _progress(order, progress, f"-> {out_dir}"):
            payload, label, _ = ds._load(int(i))
            writer.add(label, bytes(payload))
        n, c = writer.close()
    except BaseException:
        writer.abort()
        raise
    if n != len(ds):
        raise RuntimeError(f"wrote {n} images, {shard_dir} holds {len(ds)}")
    return n, c


def shuffled_rec(
    source: FaceDataset, out_dir: str | os.PathLike, seed: int = 0, progress: bool = True
) -> int:
    """Write ``train.rec``/``train.idx`` with images only, shuffled (im2rec layout, for DALI).

    DALI decodes every record of a file, so header and identity records must not be there.
    Keys are ``0..N-1`` in the shuffled order; each header's ``id`` is the source index.
    """

    out = Path(out_dir)
    order = np.random.default_rng(seed).permutation(len(source))
    w = IndexedRecordIO(out / "train.idx", out / "train.rec", "w")
    try:
        for key, i in enumerate(_progress(order, progress, f"-> {out}")):
            payload, label, _ = source._load(int(i))
            w.write_idx(key, pack(IRHeader(0, float(label), int(i), 0), bytes(payload)))
        w.close()
    except BaseException:
        w.abort()
        raise
    write_property(out, source.num_classes)
    return len(order)


def _progress(items: Any, enabled: bool, desc: str) -> Any:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="img", file=sys.stderr)


def open_source(path: str) -> FaceDataset:
    """A ``.rec`` file, a shard directory, a folder holding ``train.rec``, or an image
    folder, as a dataset."""
    p = Path(path)
    if p.is_file() and p.suffix == ".rec":
        return RecordIODataset(p)
    if (p / MANIFEST).is_file():
        return ArrowDataset(p)
    if (p / "train.rec").is_file():
        return RecordIODataset(p / "train.rec")
    return ImageFolderDataset(p)
