"""Embed every face photo of a folder into a Parquet file.

::

    python -m eval.embed DIR --model model.onnx --out emb.parquet
    python -m eval.embed DIR --model backbone.pt --network r50 --out emb.parquet --workers 4

Every JPEG / PNG / WebP under ``DIR`` (any depth, hidden files and folders skipped,
sorted by path) gives **one row**:

=============  ==========================  ==============================================
column         type                        content
=============  ==========================  ==============================================
``path``       string                      relative to ``DIR``, ``/``-separated
``embedding``  list<float32> (D)           flip-test embedding, unit length; null if no face
``score``      float64                     detection score of the kept face; null if none
``landmarks``  list<float64> (10)          ``x1, y1, ..., x5, y5`` in photo pixels (EXIF
                                           orientation applied); null if no face
``box``        list<float64> (4)           ``x1, y1, x2, y2`` of the kept face; null if none
``faces``      int32                       faces the detector found
``reason``     string                      null when embedded, else ``unreadable``,
                                           ``no_face``, ``too_small``, ``low_score``,
                                           ``several_faces``
``detail``     string                      the reason in words ("" when embedded)
=============  ==========================  ==============================================

The file's schema metadata holds ``model``, ``network``, ``embedding_size``,
``image_size`` and the face options (JSON). The file is written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_path
from datasets.detect.finder import FaceOptions, FaceResult
from datasets.photos import PHOTO_SUFFIXES
from datasets.prepare import add_face_arguments, face_options, iter_faces
from eval.extract import Embedder
from eval.faces import embed_aligned, open_model
from eval.onnx_infer import add_input_arguments, input_options


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
    rows for photos without a face (``None`` when no photo has one)."""
    paths = list_photos(root)
    results: list[FaceResult] = []
    rows: list[np.ndarray | None] = []
    pending: list[int] = []

    def flush() -> None:
        crops = np.stack([results[i].crop for i in pending])
        for i, e in zip(pending, embed_aligned(embed, crops, batch_size), strict=True):
            rows[i] = e
        for i in pending:
            results[i].crop = None  # the crops are not needed any more
        pending.clear()

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
    d = 0 if emb is None else emb.shape[1]
    table = pa.table(
        {
            "path": opt(paths, pa.string()),
            "embedding": opt(
                [emb[i].tolist() if o and emb is not None else None for i, o in enumerate(ok)],
                pa.list_(pa.float32()),
            ),
            "score": opt([r.score for r in results], pa.float64()),
            "landmarks": opt(
                [r.landmarks.ravel().tolist() if r.ok else None for r in results],
                pa.list_(pa.float64()),
            ),
            "box": opt([r.box.tolist() if r.ok else None for r in results], pa.list_(pa.float64())),
            "faces": opt([r.faces for r in results], pa.int32()),
            "reason": opt([r.reason for r in results], pa.string()),
            "detail": opt([r.detail for r in results], pa.string()),
        }
    )
    table = table.replace_schema_metadata({**metadata, "embedding_size": str(d)})
    with atomic_path(out) as tmp:
        pq.write_table(table, str(tmp))


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.embed",
        description="One row per photo of DIR: path, flip-test embedding, detection "
        "score and 5 landmarks, to Parquet.",
    )
    p.add_argument("dir")
    p.add_argument("--model", required=True, help="ONNX file, or a backbone checkpoint")
    p.add_argument("--network", help="backbone name for a checkpoint (r50, mbf, ...)")
    p.add_argument("--out", required=True, help="the .parquet file to write")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="processes detecting faces")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--no-progress", action="store_true")
    add_face_arguments(p, min_size=20.0)
    add_input_arguments(p)
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.workers < 1:
        p.error("--batch-size and --workers must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the number of photos embedded."""
    args = _parse_args(argv)
    embed, size = open_model(args.model, args.network, args.device, input_options(args))
    options = face_options(args, image_size=size)
    paths, results, emb = embed_folder(
        args.dir,
        embed,
        options,
        batch_size=args.batch_size,
        workers=args.workers,
        progress=not args.no_progress,
    )
    meta = {
        "model": os.fspath(args.model),
        "network": args.network or "",
        "image_size": str(size),
        "face_options": json.dumps(options.as_dict(), sort_keys=True),
    }
    write_parquet(args.out, paths, results, emb, meta)
    n = sum(r.ok for r in results)
    print(f"embedded {n} of {len(paths)} photos -> {args.out}")
    return n


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
