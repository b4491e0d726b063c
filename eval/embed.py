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
from typing import Any

from common.cli import run_main
from datasets.faces.arguments import add_face_arguments
from eval.jsonio import printable
from eval.onnx_options import add_input_arguments, input_options


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
    p.add_argument("--batch-size", type=int, default=64, help="faces per model call")
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
    from eval.extract import embedder_name
    from eval.faces import finder_options, open_model
    from eval.jsonio import dumps
    from eval.photo_embeddings import NON_FINITE, embed_folder, write_parquet

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
