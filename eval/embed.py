"""Embed every face photo of a folder into a Parquet file.

::

    python -m eval.embed DIR --model model.onnx --out emb.parquet
    python -m eval.embed DIR --model backbone.pt --network r50 --out emb.parquet --workers 4

Every JPEG / PNG / WebP under ``DIR`` (any depth, hidden files and folders skipped,
sorted by path) gives **one row**:

=============  ==========================  ==============================================
column         type                        content
=============  ==========================  ==============================================
``path``       string                      relative to ``DIR``, ``/``-separated (bytes of
                                           a name that is not UTF-8 shown as ``\\xNN``)
``path_bytes`` binary                      the same path, its exact bytes
``embedding``  list<float32> (D)           flip-test embedding, unit length; null if no face
``score``      float64                     detection score of the kept face; null if none
``landmarks``  list<float64> (10)          ``x1, y1, ..., x5, y5`` in photo pixels (EXIF
                                           orientation applied); null if no face
``box``        list<float64> (4)           ``x1, y1, x2, y2`` of the kept face; null if none
``faces``      int32                       faces the detector found
``reason``     string                      null when embedded, else a face finder reason
                                           (``unreadable``, ``no_face``, ``too_small``,
                                           ``low_score``, ``several_faces``, ...) or
                                           ``non_finite_embedding`` (the model gave NaN
                                           or infinity for the face: score, landmarks
                                           and box are kept, the embedding is null)
``detail``     string                      the reason in words ("" when embedded)
=============  ==========================  ==============================================

The file's schema metadata holds ``model``, ``network``, ``embedding_size``,
``image_size``, the face options (JSON) and, for an ONNX model, ``input_convention``
(JSON: mean, std, colour, layout, size and where each came from, as printed on
stderr). The file is written atomically; ``--out``'s directory is checked before any
work. Only rows with a finite embedding count as
embedded.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_path
from common.cli import run_main
from datasets.faces.arguments import add_face_arguments
from datasets.faces.finder import FaceOptions, FaceResult
from datasets.faces.photos import PHOTO_SUFFIXES
from datasets.faces.pool import iter_faces
from eval.extract import Embedder, embedder_name
from eval.faces import embed_aligned_rows, finder_options, open_model, printable
from eval.jsonio import dumps
from eval.onnx_infer import add_input_arguments, input_options

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


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.embed",
        description="One row per photo of DIR: path, flip-test embedding, detection "
        "score and 5 landmarks, to Parquet.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("dir")
    p.add_argument("--model", required=True, help="ONNX file, or a backbone checkpoint")
    p.add_argument("--network", help="backbone name for a checkpoint (r50, mbf, ...)")
    p.add_argument("--out", required=True, help="the .parquet file to write")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="processes detecting faces")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--no-progress", action="store_true")
    add_face_arguments(p)
    add_input_arguments(p)
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.workers < 1:
        p.error("--batch-size and --workers must be >= 1")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        p.error(f"--out {printable(args.out)}: its directory does not exist")
    if os.path.isdir(args.out):
        p.error(f"--out {printable(args.out)}: is a directory, not a .parquet file")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns ``{"embedded", "photos", "non_finite", "out"}``:
    photos embedded (finite embeddings only), photos listed, faces whose embedding was
    not finite, the file written."""
    args = _parse_args(argv)
    embed, size = open_model(args.model, args.network, args.device, input_options(args))
    convention = embed.convention() if hasattr(embed, "convention") else None
    if convention is not None:
        print(embed.describe(), file=sys.stderr)  # type: ignore[attr-defined]
    options = finder_options(args, size, args.model)
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
        "face_options": dumps(options.as_dict(), indent=None, source="face options"),
    }
    if convention is not None:  # an ONNX model's input convention, and where it came from
        meta["input_convention"] = dumps(convention, indent=None, source="input convention")
    write_parquet(args.out, paths, results, emb, meta)
    n = sum(r.ok for r in results)
    bad = sum(r.reason == NON_FINITE for r in results)
    print(f"embedded {n} of {len(paths)} photos -> {printable(args.out)}")
    if bad:
        who = printable(embedder_name(embed)) or "the model"
        print(
            f"warning: {who} gave a non-finite embedding (NaN or infinity) for {bad} of "
            f"{n + bad} faces (reason {NON_FINITE}); its weights or graph are broken",
            file=sys.stderr,
        )
    return {"embedded": n, "photos": len(paths), "non_finite": bad, "out": args.out}


if __name__ == "__main__":
    sys.exit(run_main(main, prog="eval.embed"))
