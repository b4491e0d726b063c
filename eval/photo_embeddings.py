"""Embedding every face photo of a folder, and the Parquet file of the result: the
library of ``eval.embed`` (see that command for the file's columns and metadata), which
imports it after parsing its arguments so that ``--help`` stays fast."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_path
from datasets.faces.finder import FaceResult
from datasets.faces.options import FaceOptions
from datasets.faces.photos import PHOTO_SUFFIXES
from datasets.faces.pool import iter_faces
from eval.extract import Embedder, embedder_name
from eval.faces import embed_aligned_rows
from eval.jsonio import printable

#: The ``reason`` of a face whose embedding is NaN or infinite.
NON_FINITE = "non_finite_embedding"


def list_photos(root: str | os.PathLike[str]) -> list[str]:
    """Photo files under ``root`` as sorted ``/``-separated relative paths."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    found = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if not name.startswith(".") and name.lower().endswith(PHOTO_SUFFIXES):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


def embed_folder(
    root: str | os.PathLike[str],
    embed: Embedder,
    options: FaceOptions,
    *,
    batch_size: int = 64,
    workers: int = 1,
    progress: bool = False,
) -> tuple[list[str], list[FaceResult], np.ndarray | None]:
    """``(paths, face results, embeddings)``: ``embeddings`` is float32 ``(N, D)`` with NaN
    rows for photos without a face or with a non-finite embedding (whose result gets the
    reason :data:`NON_FINITE`); ``None`` when no photo has one."""
    paths = list_photos(root)
    results: list[FaceResult] = []
    rows: list[np.ndarray | None] = []
    pending: list[int] = []

    def flush() -> None:
        crops = np.stack([results[i].crop for i in pending])
        emb, finite = embed_aligned_rows(embed, crops, batch_size)
        for i, e, ok in zip(pending, emb, finite, strict=True):
            if ok:
                rows[i] = e
            else:
                results[i].reason = NON_FINITE
                results[i].detail = f"{who} gave a non-finite embedding (NaN or infinity)"
        for i in pending:
            results[i].crop = None  # the crops are not needed any more
        pending.clear()

    name = printable(embedder_name(embed))
    who = f"{name}: the model" if name else "the model"
    found = iter_faces([Path(root, p) for p in paths], options, workers)
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        found = tqdm(found, total=len(paths), unit="photo", file=sys.stderr)
    for r in found:
        results.append(r)
        rows.append(None)
        if r.ok:
            pending.append(len(results) - 1)
            if len(pending) == batch_size:
                flush()
    if pending:
        flush()
    dims = {e.shape[0] for e in rows if e is not None}
    if not dims:
        return paths, results, None
    d = dims.pop()
    emb = np.full((len(rows), d), np.nan, np.float32)
    for i, e in enumerate(rows):
        if e is not None:
            emb[i] = e
    return paths, results, emb


def write_parquet(
    out: str | os.PathLike[str],
    paths: list[str],
    results: list[FaceResult],
    emb: np.ndarray | None,
    metadata: dict[str, str],
) -> None:
    """The rows described in the module docstring, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def opt(values: list[Any], t: Any) -> Any:
        return pa.array(values, type=t)

    ok = [r.ok for r in results]
    found = [r.ok or r.reason == NON_FINITE for r in results]  # a face was kept
    d = 0 if emb is None else emb.shape[1]

    def text(value: str | None) -> str | None:  # valid UTF-8 whatever the file names
        return None if value is None else printable(value)

    table = pa.table(
        {
            "path": opt([printable(p) for p in paths], pa.string()),
            "path_bytes": opt([os.fsencode(p) for p in paths], pa.binary()),
            "embedding": opt(
                [emb[i].tolist() if o and emb is not None else None for i, o in enumerate(ok)],
                pa.list_(pa.float32()),
            ),
            "score": opt([r.score for r in results], pa.float64()),
            "landmarks": opt(
                [
                    r.landmarks.ravel().tolist() if f else None
                    for r, f in zip(results, found, strict=True)
                ],
                pa.list_(pa.float64()),
            ),
            "box": opt(
                [r.box.tolist() if f else None for r, f in zip(results, found, strict=True)],
                pa.list_(pa.float64()),
            ),
            "faces": opt([r.faces for r in results], pa.int32()),
            "reason": opt([text(r.reason) for r in results], pa.string()),
            "detail": opt([text(r.detail) for r in results], pa.string()),
        }
    )
    meta = {printable(k): printable(v) for k, v in metadata.items()}
    table = table.replace_schema_metadata({**meta, "embedding_size": str(d)})
    with atomic_path(out) as tmp:
        pq.write_table(table, str(tmp))
