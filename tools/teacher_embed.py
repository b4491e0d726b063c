"""Cache a teacher's embeddings of every record of a training set, once, so that
distillation (``distill.cache=DIR``) runs no teacher while training::

    python -m tools.teacher_embed data/ms1mv3 --teacher work_dirs/r100/backbone.pt \\
        --teacher-network r100 --out data/ms1mv3_r100_emb [--flip]
    python -m tools.teacher_embed data/ms1mv3 --teacher glint360k_r100.onnx --out ...

Under ``torchrun`` every rank embeds whole shards (shard ``k`` on rank ``k mod W``,
``--shard-rows`` records each) on its own device, and rank 0 writes the manifest once
all are in place.

DATA is what ``data.root`` names (a RecordIO or Arrow dataset, or several, as one
concatenated set in the order given). Each record's image is decoded as the loader
decodes it, without random flip or augmentation, converted on the device to the
teacher's input convention and embedded (with ``--flip``, the mean of the image's and
its mirror's embeddings). The output (:mod:`datasets.teacher_cache`) is Arrow shards
keyed by record index and a manifest naming the teacher's SHA-256 and the data's
signature; training refuses a cache of other data or another teacher. OUT is owned
(:class:`common.outdir.OwnedDir`): a non-empty directory this command did not make is
refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from common.cli import run_main
from common.errors import UsageError

COMMAND = "tools.teacher_embed"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tools.teacher_embed",
        description="Write a teacher's embeddings of every training record (for "
        "distill.cache=OUT).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("data", nargs="+", help="the training data, as data.root names it")
    p.add_argument(
        "--teacher", required=True, help="the teacher's backbone weights, or an ONNX model"
    )
    p.add_argument(
        "--teacher-network",
        default="",
        help="its network name (r100, r50, mbf, ...); none for an ONNX teacher",
    )
    p.add_argument("--out", required=True, help="the cache directory (owned by this command)")
    p.add_argument(
        "--flip", action="store_true", help="store the mean of each image's and its mirror's"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--shard-rows",
        type=int,
        default=None,
        help="records per shard (default: datasets.teacher_cache.SHARD_ROWS); under "
        "torchrun each rank embeds whole shards",
    )
    p.add_argument("--num-workers", type=int, default=2, help="decoding processes")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--overwrite", action="store_true", help="write into a foreign directory")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.shard_rows is not None and args.shard_rows < 1:
        p.error(f"--shard-rows must be >= 1, got {args.shard_rows}")
    if args.num_workers < 0:
        p.error(f"--num-workers must be >= 0, got {args.num_workers}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the cache's manifest."""
    args = _parse_args(argv)

    import dataclasses
    import os

    from backbones.registry import input_spec
    from common.digest import sha256_file
    from common.dist import distributed_command
    from common.face_input import ARCFACE_INPUT
    from common.outdir import OutputDirError, OwnedDir
    from datasets.multi import open_datasets
    from datasets.teacher_cache import SHARD_ROWS, cache_files, dataset_signature, write_manifest
    from trainer.teacher import Teacher, write_teacher_cache

    if not os.path.isfile(args.teacher):
        raise UsageError(f"--teacher: no such file {args.teacher!r}")
    onnx = args.teacher.lower().endswith(".onnx")
    if onnx and args.teacher_network:
        raise UsageError("--teacher-network: an ONNX teacher carries its own network")
    if not onnx:
        if not args.teacher_network:
            raise UsageError("--teacher-network: required for a weight file (r100, mbf, ...)")
        try:
            input_spec(args.teacher_network)
        except ValueError as exc:
            raise UsageError(f"--teacher-network: {exc}") from None
    shard_rows = args.shard_rows or SHARD_ROWS
    with distributed_command(args.device) as ctx:
        dataset = open_datasets(args.data, option="DATA", flip=False)
        # the images as the loader delivers them: arcface_torch's convention, the data's side
        images = dataclasses.replace(ARCFACE_INPUT, size=dataset.image_size)
        teacher = Teacher.load(args.teacher, args.teacher_network or None, images, ctx.device)
        facts = {
            "teacher": os.path.basename(args.teacher),
            "teacher_sha256": sha256_file(args.teacher),
            "teacher_network": args.teacher_network or "onnx",
            "flip": args.flip,
        }
        names = cache_files(len(dataset), shard_rows)
        owned = OwnedDir(args.out, COMMAND, "--out", overwrite=args.overwrite)
        error = None
        if ctx.is_main:  # one owner: rank 0 claims and locks OUT for every rank
            try:
                owned.open()
                owned.record(*names)
            except OutputDirError as exc:
                error = str(exc)
        errors = [e for e in ctx.all_gather_object(error) if e]
        if errors:
            raise OutputDirError(errors[0])
        try:
            write_teacher_cache(
                teacher,
                dataset,
                args.out,
                flip=args.flip,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                progress=not args.no_progress and ctx.is_main,
                rank=ctx.rank,
                world_size=ctx.world_size,
                shard_rows=shard_rows,
            )
            ctx.barrier()  # every shard is in place: the manifest is the last write
            manifest = {}
            if ctx.is_main:
                facts["dataset"] = dataset_signature(dataset)
                manifest = write_manifest(args.out, facts, teacher.embedding_size, shard_rows)
                owned.commit(*names)
        finally:
            if ctx.is_main:
                owned.close()
    if not ctx.is_main:
        return {}
    print(
        f"{args.out}: {manifest['dataset']['records']} embeddings of {manifest['embedding_size']} "
        f"dimensions from {facts['teacher']} ({facts['teacher_network']}, sha256 "
        f"{facts['teacher_sha256'][:16]}...){', flip-averaged' if args.flip else ''}"
    )
    return manifest


if __name__ == "__main__":
    sys.exit(run_main(main, prog=COMMAND))
