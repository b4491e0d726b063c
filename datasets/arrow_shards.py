"""Arrow IPC shards: conversion from/to RecordIO and image folders, and a memory-mapped Dataset.

A shard directory holds ``shard-00000.arrow``, ``shard-00001.arrow``, ... (Arrow IPC *file*
format, columns ``label: int64``, ``image: binary`` (encoded JPEG/PNG), ``key: int64``
(source RecordIO key, or -1)) and ``manifest.json`` (shard names and row counts,
``num_classes``, ``num_images``). Rows keep the source order (class-grouped for face data).

Commands (each with a progress bar; output files appear atomically)::

    python -m datasets.arrow_shards rec2arrow  train.rec OUT_DIR [--shard-size 100000]
    python -m datasets.arrow_shards folder2arrow IMAGE_ROOT OUT_DIR
    python -m datasets.arrow_shards arrow2rec  SHARD_DIR OUT_DIR      # face-layout train.rec
    python -m datasets.arrow_shards shuffle-rec train.rec OUT_DIR [--seed 0]   # for DALI

``rec2arrow``/``folder2arrow`` are resumable: finished shards are kept (their row count is
checked) and only missing shards are written; counts are verified at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from datasets.atomic import atomic_path, write_json
from datasets.dataset import FaceDataset, ImageFolderDataset, RecordIODataset

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
    source: FaceDataset, keys: np.ndarray | None, lo: int, hi: int, bar: Any
) -> Iterator[tuple[int, bytes, int]]:
    for i in range(lo, hi):
        payload, label, _ = source._load(i)
        yield label, bytes(payload), int(keys[i]) if keys is not None else -1
        if bar is not None:
            bar.update(1)


def convert_to_shards(
    source: FaceDataset,
    out_dir: str | os.PathLike,
    shard_size: int = 100_000,
    progress: bool = True,
) -> dict[str, Any]:
    """Write every sample of ``source`` (raw encoded bytes, no re-encoding) into shards.

    Resumable: a shard file already present with the expected row count is kept.
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
    try:
        for s in range(n_shards):
            lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
            path = out / shard_name(s)
            if path.is_file() and _count_rows(path) == hi - lo:
                rows = hi - lo  # finished by an earlier run
                if bar is not None:
                    bar.update(rows)
            else:
                rows = _write_shard(path, _rows(source, keys, lo, hi, bar))
            shards.append({"file": path.name, "rows": rows})
    finally:
        if bar is not None:
            bar.close()
    total = sum(_count_rows(out / s["file"]) for s in shards)
    if total != n:
        raise RuntimeError(f"{out}: shards hold {total} rows, the source has {n} images")
    manifest = {
        "format": "partial-fc arrow shards v1",
        "columns": [name for name, _ in SCHEMA_FIELDS],
        "num_images": n,
        "num_classes": int(source.num_classes),
        "shards": shards,
    }
    write_json(out / MANIFEST, manifest, indent=1)
    return manifest


def read_manifest(shard_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (not an Arrow shard directory?)")
    return json.loads(path.read_text())


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
        self._open()
        self._len = int(self._starts[-1]) if len(self._starts) else 0
        expected = sum(int(e["rows"]) for e in entries)
        if self._len != expected:
            raise ValueError(f"{self.shard_dir}: shards hold {self._len} rows, manifest {expected}")

    def _open(self) -> None:
        pa = _pa()
        batches = []
        starts = [0]
        for f in self.files:
            src = pa.memory_map(str(f), "r")
            reader = pa.ipc.open_file(src)
            if reader.schema.names[:2] != ["label", "image"]:
                raise ValueError(f"{f}: columns {reader.schema.names}, expected label, image")
            for b in range(reader.num_record_batches):
                batch = reader.get_batch(b)
                images = batch.column(1)
                _, off_buf, data_buf = images.buffers()
                offsets = np.frombuffer(off_buf, np.int32)[
                    images.offset : images.offset + len(images) + 1
                ]
                data = (
                    np.frombuffer(data_buf, np.uint8)
                    if data_buf is not None
                    else np.zeros(0, np.uint8)
                )
                labels = batch.column(0).to_numpy(zero_copy_only=True)
                keys = batch.column(2).to_numpy(zero_copy_only=True)
                batches.append((labels, offsets, data, keys, f"{f} batch {b}"))
                starts.append(starts[-1] + batch.num_rows)
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


# ----------------------------------------------------------------------------- rec writers


def shards_to_rec(
    shard_dir: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True
) -> tuple[int, int]:
    """Write a face-layout ``train.rec``/``train.idx``/``property`` from Arrow shards.

    Rows are written grouped by label (stable: source order within a class), so a
    ``rec2arrow`` → ``arrow2rec`` round trip reproduces the original face-layout file.
    """
    from datasets.face_layout import FaceRecWriter

    ds = ArrowDataset(shard_dir)
    labels = np.concatenate([b[0] for b in ds._batches]) if ds._batches else np.zeros(0)
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
    from datasets.face_layout import write_property
    from datasets.recordio import IndexedRecordIO, IRHeader, pack

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


def _open_source(path: str) -> FaceDataset:
    p = Path(path)
    if p.is_file() and p.suffix == ".rec":
        return RecordIODataset(p)
    if (p / MANIFEST).is_file():
        return ArrowDataset(p)
    if (p / "train.rec").is_file():
        return RecordIODataset(p / "train.rec")
    return ImageFolderDataset(p)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m datasets.arrow_shards", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("rec2arrow", "folder2arrow"):
        s = sub.add_parser(name)
        s.add_argument("source")
        s.add_argument("out_dir")
        s.add_argument("--shard-size", type=int, default=100_000)
    s = sub.add_parser("arrow2rec")
    s.add_argument("source")
    s.add_argument("out_dir")
    s = sub.add_parser("shuffle-rec")
    s.add_argument("source", help=".rec file, shard dir or image folder")
    s.add_argument("out_dir")
    s.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.cmd == "rec2arrow":
        m = convert_to_shards(RecordIODataset(a.source), a.out_dir, a.shard_size)
        print(f"{m['num_images']} images, {m['num_classes']} classes, {len(m['shards'])} shards")
    elif a.cmd == "folder2arrow":
        m = convert_to_shards(ImageFolderDataset(a.source), a.out_dir, a.shard_size)
        print(f"{m['num_images']} images, {m['num_classes']} classes, {len(m['shards'])} shards")
    elif a.cmd == "arrow2rec":
        n, c = shards_to_rec(a.source, a.out_dir)
        print(f"wrote {n} images of {c} classes to {a.out_dir}/train.rec")
    else:
        n = shuffled_rec(_open_source(a.source), a.out_dir, a.seed)
        print(f"wrote {n} shuffled images to {a.out_dir}/train.rec")
    return 0


if __name__ == "__main__":
    sys.exit(main())
