"""Arrow IPC shards from/to RecordIO and image folders: the command. The library (the
conversions and the memory-mapped :class:`~datasets.arrow_io.ArrowDataset`) is
:mod:`datasets.arrow_io`.

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
checked) and only missing shards are written; counts are verified at the end. Every row is
checked while it is converted (label in ``[0, num_classes)`` and an integer, image
decodable): a bad row stops the conversion with a :class:`~datasets.errors.DataError`
naming the source file, key and offset, or with ``--skip-bad`` is left out, reported on
stderr and listed under ``skipped`` in the manifest.

Reading (:class:`~datasets.arrow_io.ArrowDataset`) checks ``manifest.json`` (keys,
types, shard names inside the directory, row counts), every shard's schema
(``label``/``key`` integer columns, ``image`` ``binary`` or ``large_binary``, no nulls)
and that every label lies in ``[0, num_classes)``, naming the shard.
"""

from __future__ import annotations

import argparse
import sys

from common.cli import run_main


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (errors raise)."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(
        prog="python -m datasets.arrow_shards",
        description="Arrow IPC shards from/to RecordIO and image folders: rec2arrow, "
        "folder2arrow, arrow2rec, shuffle-rec (each with a progress bar; output files appear "
        "atomically; rec2arrow and folder2arrow resume).",
        formatter_class=fmt,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("rec2arrow", "folder2arrow"):
        s = sub.add_parser(name, formatter_class=fmt)
        s.add_argument("source")
        s.add_argument("out_dir")
        s.add_argument("--shard-size", type=int, default=100_000, help="rows per shard")
        s.add_argument(
            "--skip-bad",
            action="store_true",
            help="leave out records with a bad label or an undecodable image (reported on "
            "stderr and in manifest.json) instead of stopping at the first",
        )
        s.add_argument(
            "--no-decode-check",
            action="store_true",
            help="do not decode every image while converting (labels are still checked)",
        )
    s = sub.add_parser("arrow2rec", formatter_class=fmt)
    s.add_argument("source")
    s.add_argument("out_dir")
    s = sub.add_parser("shuffle-rec", formatter_class=fmt)
    s.add_argument("source", help=".rec file, shard dir or image folder")
    s.add_argument("out_dir")
    s.add_argument("--seed", type=int, default=0, help="shuffle seed")
    a = p.parse_args(argv)
    from datasets.arrow_io import convert_to_shards, open_source, shards_to_rec, shuffled_rec
    from datasets.dataset import ImageFolderDataset, RecordIODataset

    if a.cmd in ("rec2arrow", "folder2arrow"):
        source = RecordIODataset(a.source) if a.cmd == "rec2arrow" else ImageFolderDataset(a.source)
        m = convert_to_shards(
            source, a.out_dir, a.shard_size, check=not a.no_decode_check, skip_bad=a.skip_bad
        )
        print(f"{m['num_images']} images, {m['num_classes']} classes, {len(m['shards'])} shards")
    elif a.cmd == "arrow2rec":
        n, c = shards_to_rec(a.source, a.out_dir)
        print(f"wrote {n} images of {c} classes to {a.out_dir}/train.rec")
    else:
        n = shuffled_rec(open_source(a.source), a.out_dir, a.seed)
        print(f"wrote {n} shuffled images to {a.out_dir}/train.rec")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="datasets.arrow_shards"))
