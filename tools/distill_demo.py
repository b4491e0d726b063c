"""The distillation demo (``make distill-demo``, docs/training.md "Distillation").

1. **Teacher**: ``configs/demo``'s ``mbf_tiny`` (512-d) trained on synthetic identities
   (``make distill-demo``: 200 identities x 30 images), stored by the demo in
   ``<out>/teacher/backbone.pt`` and verified on the held-out identities.
   ``--teacher-epochs`` at the demo's batch (32 images per rank).
2. **Cache**: the teacher's embeddings of every record, once, in ``<out>/cache``, each
   rank embedding its shards as ``torchrun -m tools.teacher_embed`` does.
3. **Students**, four runs of the same steps (``--student-epochs`` at a per-rank batch of
   ``--student-batch-size``: the whole LR schedule) and seed: a smaller
   MobileFaceNet (``width_mult`` ``--student-width``, ``--student-dim``-d embeddings, so
   the embedding term learns a projection) trained
   * alone (the head only),
   * with embedding distillation from the online teacher,
   * with relation distillation from the online teacher,
   * with embedding distillation from the cache (no teacher forward while training),
   each verified after its last step on the held-out pairs (10 folds).
4. Print the table and write ``<out>/distill_demo.json``.

Run it under torchrun (every rank runs the same runs in-process; rank 0 writes)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 -m tools.distill_demo
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.atomic import write_json
from common.cli import run_main
from tools.demo_runs import run


def _steps(history: list[dict[str, Any]]) -> int:
    return int(history[-1]["step"])


def _accuracy(history: list[dict[str, Any]]) -> dict[str, float]:
    result = history[-1]["results"]["heldout"]
    return {"accuracy": result["accuracy"], "std": result.get("accuracy_std", 0.0)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.distill_demo",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", default="data/synthetic_distill")
    parser.add_argument("--out", default="work_dirs/distill_demo")
    parser.add_argument("--teacher-epochs", type=int, default=1, help="at the demo's batch")
    parser.add_argument(
        "--student-batch-size", type=int, default=32, help="images per rank and step"
    )
    parser.add_argument("--student-epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None, help="stop every run there")
    parser.add_argument("--student-width", type=float, default=0.125)
    parser.add_argument("--student-dim", type=int, default=128)
    parser.add_argument("--embedding-weight", type=float, default=4.0)
    parser.add_argument("--relation-weight", type=float, default=32.0)
    args = parser.parse_args(argv)

    import os

    import torch

    from backbones.registry import input_spec
    from common.digest import sha256_file
    from common.dist import distributed_command
    from datasets.multi import open_datasets
    from datasets.teacher_cache import dataset_signature, write_manifest
    from trainer.teacher import Teacher, write_teacher_cache

    started = time.perf_counter()
    out = Path(args.out)
    data = Path(args.data)
    meta = json.loads((data / "meta.json").read_text())
    with distributed_command() as ctx:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        common = [
            f"data.root={data}",
            f"data.num_classes={meta['num_classes']}",
            f"data.num_images={meta['num_images']}",
            "log.tensorboard=false",
            "log.progress_bar=false",
            "checkpoint.every_steps=0",
            "eval.at_start=false",
            "eval.every_steps=0",
            *([f"train.max_steps={args.max_steps}"] if args.max_steps else []),
        ]
        teacher_hist, teacher_s = run(
            "teacher",
            [*common, f"train.epochs={args.teacher_epochs}", f"train.output={out / 'teacher'}"],
            ctx,
        )
        teacher_file = out / "teacher" / "backbone.pt"
        cache = out / "cache"
        begun = time.perf_counter()
        if ctx.is_main:
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir(parents=True)
        ctx.barrier()
        # every rank embeds its shards of the records, rank 0 writes the manifest
        teacher = Teacher.from_file(teacher_file, "mbf_tiny", input_spec("mbf_tiny"), ctx.device)
        dataset = open_datasets([data], flip=False)
        shard_rows = -(-len(dataset) // (2 * ctx.world_size))  # two shards per rank
        write_teacher_cache(
            teacher, dataset, cache, num_workers=1, rank=ctx.rank,
            world_size=ctx.world_size, shard_rows=shard_rows,
        )  # fmt: skip
        ctx.barrier()
        if ctx.is_main:
            facts = {
                "teacher": teacher_file.name,
                "teacher_sha256": sha256_file(teacher_file),
                "teacher_network": "mbf_tiny",
                "flip": False,
                "dataset": dataset_signature(dataset),
            }
            write_manifest(
                cache, facts, teacher.embedding_size, -(-len(dataset) // (2 * ctx.world_size))
            )
        ctx.barrier()
        cache_s = time.perf_counter() - begun
        if ctx.is_main:
            print(f"== cache: {len(dataset)} embeddings in {cache_s:.0f} s", flush=True)
        student = [
            *common,
            f"train.epochs={args.student_epochs}",
            f"data.batch_size={args.student_batch_size}",
            "model.network=mbf_tiny",
            f"model.embedding_size={args.student_dim}",
            f'model.kwargs={{"width_mult": {args.student_width}}}',
        ]
        online = [f"distill.teacher={teacher_file}", "distill.teacher_network=mbf_tiny"]
        embedding = [f"distill.embedding_weight={args.embedding_weight}"]
        relation = [f"distill.relation_weight={args.relation_weight}"]
        runs: dict[str, dict[str, Any]] = {}
        for name, extra in (
            ("student alone", []),
            ("+ embedding distillation", [*online, *embedding]),
            ("+ relation distillation", [*online, *relation]),
            ("+ embedding distillation, cached", [f"distill.cache={cache}", *embedding]),
        ):
            slug = name.strip("+ ").replace(", ", "_").replace(" ", "_")
            hist, seconds = run(name, [*student, *extra, f"train.output={out / slug}"], ctx)
            runs[name] = {"history": hist, "seconds": round(seconds, 1), "overrides": extra}
        if ctx.is_main:
            total = time.perf_counter() - started
            report(runs, teacher_hist, teacher_s, cache_s, args, total, out)
    return 0


def report(
    runs: dict[str, dict[str, Any]],
    teacher_hist: list[dict[str, Any]],
    teacher_s: float,
    cache_s: float,
    args: argparse.Namespace,
    total_s: float,
    out: Path,
) -> None:
    """Print the table and write ``distill_demo.json``."""
    rows = {"teacher (mbf_tiny, 512-d)": _accuracy(teacher_hist)}
    rows.update({name: _accuracy(r["history"]) for name, r in runs.items()})
    print(
        f"\nheld-out verification (10 folds); teacher {_steps(teacher_hist)} steps, students "
        f"{_steps(next(iter(runs.values()))['history'])} steps each (width "
        f"{args.student_width}, {args.student_dim}-d)"
    )
    for name, acc in rows.items():
        seconds = runs[name]["seconds"] if name in runs else round(teacher_s, 1)
        print(f"{name:36s} {acc['accuracy']:.3f} +- {acc['std']:.3f}   {seconds:.0f} s")
    print(f"total {total_s:.0f} s (teacher {teacher_s:.0f} s, cache {cache_s:.0f} s)")
    write_json(
        out / "distill_demo.json",
        {
            "settings": vars(args),
            "accuracy": rows,
            "seconds": {
                "total": round(total_s, 1),
                "teacher": round(teacher_s, 1),
                "cache": round(cache_s, 1),
                **{name: r["seconds"] for name, r in runs.items()},
            },
        },
        sort_keys=False,
    )
    print(f"wrote {out / 'distill_demo.json'}")


if __name__ == "__main__":
    sys.exit(run_main(main, prog="tools.distill_demo"))
