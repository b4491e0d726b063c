"""From a folder of raw photos to face-recognition training data.

::

    python -m datasets.prepare RAW_DIR OUT_DIR [--detector mtcnn|det_10g.onnx]
        [--policy largest|central|single] [--min-size 40] [--min-score S]
        [--max-pixels 40000000] [--workers N] [--arrow] [--format jpg|png]
        [--quality 95] [--dup-distance 6] [--overwrite]

``RAW_DIR`` holds one sub-folder per identity (its name is the identity; photos may sit
in nested folders below it) of JPEG, PNG or WebP photos of up to ``--max-pixels``
pixels; EXIF orientation is honoured. Symlinked folders are not followed (listed as
ignored, with a trailing ``/``); a photo that is a symlink to a regular file is read.
Every photo goes through :class:`datasets.faces.finder.FaceFinder`: detection
(MTCNN built in, or an insightface SCRFD/RetinaFace ``.onnx``), one face kept by the
policy, 5-point similarity alignment to 112x112. ``OUT_DIR`` receives:

* ``train.rec``, ``train.idx``, ``property`` — the face layout the trainer reads
  (:class:`datasets.face_layout.FaceRecWriter`); labels ``0..C-1`` follow the sorted
  names of the identities that kept at least one face, images follow the sorted paths;
* ``labels.tsv`` — ``label, identity, images``;
* ``faces.tsv`` — every kept face: ``key, label, file, score, faces, box, landmarks``;
* ``rejected.tsv`` — ``file, reason, detail`` for every photo not kept (reasons:
  ``unreadable``, ``not_a_file``, ``too_large``, ``no_face``, ``too_small``,
  ``low_score``, ``several_faces``);
* ``report.json`` — counts per identity and per reason, near-duplicate pairs, options;
* ``arrow/`` — Arrow shards of the same images, with ``--arrow``.

Names (identities, files) are written escaped in all of them
(:func:`datasets.preparation.escape_name`):
a backslash is doubled, tab/newline/CR are ``\\t``/``\\n``/``\\r``, a byte that is not
UTF-8 is ``\\xNN``; :func:`~datasets.preparation.unescape_name` gives the name back.

**OUT_DIR is owned** (:class:`common.outdir.OwnedDir`): ``OUT_DIR/.owner.json`` says
that ``datasets.prepare`` made it. A non-empty directory it did not make is refused,
naming what is there, unless ``--overwrite`` is given (then files of the same names are
replaced, and nothing else is touched). The command never deletes a file it did not
write: only the outputs its manifest lists, its cache chunks and its own temporary
files. One run at a time holds ``OUT_DIR/.lock``; a second run on the same OUT_DIR is
refused, naming the first. The manifest says ``"complete": false`` while a run writes
and is rewritten with ``"complete": true`` as the very last step; training refuses an
OUT_DIR whose manifest is incomplete (:func:`common.outdir.check_complete`).

**Resumable and idempotent.** Photos are processed in chunks (up to 32 photos of one
identity); each finished chunk's result (encoded crops and detections) is written
atomically to ``OUT_DIR/.prepare_cache/`` under a key hashing the options, the library
versions that affect the pixels and every photo's path, size and modification time. A
rerun reuses every valid chunk and computes the rest, then writes all outputs again from
the chunks in sorted order: an interrupted run, rerun, gives the same bytes as an
uninterrupted one, and a rerun of a finished job rewrites the same bytes. Chunks of
photos that are gone or changed are deleted at the end of a successful run. Nothing in
the outputs depends on the number of workers, timing or the cache.

**Near-duplicates** within an identity are reported (not removed): pairs of kept faces
whose perceptual hashes (:func:`datasets.preparation.phash`: 63 bits from the DCT of the
aligned crop) differ in at most ``--dup-distance`` bits.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from common.cli import run_main
from datasets.faces.arguments import add_face_arguments, face_options

# -------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (argparse only: no heavy import)."""
    p = argparse.ArgumentParser(
        prog="python -m datasets.prepare",
        description="Detect, align and pack a folder of raw photos (one sub-folder per "
        "identity) into face-layout training data (train.rec/.idx, property), with "
        "report.json and rejected.tsv. Resumable: rerun the same command after an "
        "interruption.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("raw_dir", help="RAW_DIR/<identity>/<photo>.jpg|.png|.webp")
    p.add_argument("out_dir", help="output directory (created)")
    add_face_arguments(p)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    p.add_argument("--format", choices=("jpg", "png"), default="jpg", help="crop encoding")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of the crops")
    p.add_argument(
        "--dup-distance",
        type=int,
        default=6,
        help="report pairs of faces of one identity whose 63-bit perceptual hashes differ "
        "in at most this many bits (-1: off)",
    )
    p.add_argument("--arrow", action="store_true", help="also write Arrow shards to OUT/arrow")
    p.add_argument("--shard-size", type=int, default=100_000, help="rows per Arrow shard")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty OUT_DIR that datasets.prepare did not make (files "
        "of the output names are replaced; nothing else is touched)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command; expected failures raise (:func:`common.cli.run_main` prints them)."""
    args = build_parser().parse_args(argv)
    from datasets.preparation import (
        NoFaceKept,
        PrepareArgumentError,
        PrepareOptions,
        check_detector,
        prepare,
    )

    try:
        options = PrepareOptions(
            face=face_options(args),
            format=args.format,
            quality=args.quality,
            dup_distance=args.dup_distance,
            arrow=args.arrow,
            shard_size=args.shard_size,
        )
    except ValueError as exc:
        raise PrepareArgumentError(str(exc)) from None
    if args.workers < 1:
        raise PrepareArgumentError(f"--workers must be >= 1, got {args.workers}")
    check_detector(options.face)
    try:
        result = prepare(
            args.raw_dir,
            args.out_dir,
            options,
            workers=args.workers,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished chunks are kept; run the same command to resume",
            file=sys.stderr,
        )
        return 130
    t = result.report["totals"]
    why = ", ".join(f"{k} {v}" for k, v in t["reasons"].items() if v) or "none"
    print(
        f"kept {t['kept']} of {t['photos']} photos in {t['labelled_identities']} identities "
        f"(of {t['identities']}); rejected: {why}; near-duplicate pairs: "
        f"{t['near_duplicate_pairs']}; chunks computed {result.computed_chunks}, "
        f"cached {result.cached_chunks}"
    )
    folders = [f for f in result.report["ignored_files"] if f.endswith("/")]
    if folders:
        print(
            f"not entered: {len(folders)} symlinked or unreadable folders ({folders[0]}"
            f"{', ...' if len(folders) > 1 else ''}; listed in report.json)"
        )
    if not t["kept"]:
        raise NoFaceKept(f"no face kept: see {Path(args.out_dir) / 'rejected.tsv'}")
    print(f"wrote {Path(args.out_dir) / 'train.rec'} (+ .idx, property, report.json)")
    print(
        f"train on it with: data.root={args.out_dir} data.num_classes="
        f"{t['labelled_identities']} data.num_images={t['kept']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="datasets.prepare"))
