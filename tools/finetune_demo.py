"""The fine-tuning demo (``make finetune-demo``, docs/training.md "Fine-tuning").

1. **Pretrain** ``configs/demo``'s ``mbf_tiny`` on the demo's synthetic identities
   (``data/synthetic``: 400 identities x 30 images, seed 0) for ``--pretrain-epochs``.
2. **New identities** (generated once into ``--new-data``, reused while its
   ``meta.json`` matches): ``--new-identities`` identities of another seed seen by a
   new camera (:func:`camera`: grayscale, low resolution; the pretraining never saw
   such images, which is why one fine-tunes), each with ``--train-images`` training
   images and ``--heldout-images`` more that are never trained on. Two verification
   files of 10 folds of pairs (half same identity, half different): ``new.bin``, pairs
   of those held-out images; ``unseen.bin``, pairs of ``--unseen-identities`` other
   people of the same camera, in no training set.
3. Three runs of the same number of steps on the new identities, each verified on
   both files after its last step: fine-tuned from the pretrained backbone with a
   random head (``head.init=random``), with an imprinted head (``head.init=imprint``),
   and trained from scratch. The first also verifies before its first step: the
   pretrained model ("before fine-tuning").
4. Print a table and write ``<out>/finetune_demo.json``.

Run it under torchrun (every rank runs the same runs in-process; rank 0 writes)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 -m tools.finetune_demo
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import write_bytes, write_json
from tools.demo_runs import run

log = logging.getLogger("finetune_demo")

NEW_SEED = 7  # the new identities' seed (the pretraining set uses 0)
PAIR_STREAM = 4  # rng stream of the pair draws (the generator's own streams are 0-3)
CAMERA_SIDE = 40  # the new camera's resolution: faces are captured at 40x40 pixels


def camera(jpeg: bytes) -> bytes:
    """The new identities' camera: grayscale at ``CAMERA_SIDE`` pixels, upscaled back to
    112x112 (a low-resolution monochrome sensor the pretraining data never showed)."""
    import cv2

    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    small = cv2.resize(gray, (CAMERA_SIDE, CAMERA_SIDE), interpolation=cv2.INTER_AREA)
    large = cv2.resize(small, gray.shape[::-1], interpolation=cv2.INTER_LINEAR)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(large, cv2.COLOR_GRAY2BGR))
    if not ok:
        raise RuntimeError("OpenCV failed to encode a demo image")
    return buf.tobytes()


def pairs(
    rng: np.random.Generator, identities: int, images: int, pairs_per_fold: int
) -> tuple[list[tuple[tuple[int, int], tuple[int, int]]], list[bool]]:
    """10 folds of ``pairs_per_fold`` pairs of ``(identity, image)``, half of the same
    identity (two different images), half of two different identities."""
    out, issame = [], []
    half = pairs_per_fold // 2
    for _ in range(10):
        for same in [True] * half + [False] * (pairs_per_fold - half):
            if same:
                who = int(rng.integers(identities))
                a, b = (int(v) for v in rng.choice(images, 2, replace=False))
                out.append(((who, a), (who, b)))
            else:
                first, second = (int(v) for v in rng.choice(identities, 2, replace=False))
                a, b = (int(v) for v in rng.integers(images, size=2))
                out.append(((first, a), (second, b)))
            issame.append(same)
    return out, issame


def new_identities(
    out: Path,
    identities: int,
    train_images: int,
    heldout_images: int,
    unseen_identities: int,
    pairs_per_fold: int,
) -> dict[str, Any]:
    """Write the new identities' training set (``train.rec``/``train.idx``/``property``)
    and two verification files into ``out``, unless a ``meta.json`` with the same
    settings is there; return the meta. Every image goes through :func:`camera`.

    * ``new.bin``: pairs of held-out images of the training identities (images
      ``train_images ..`` of each, never trained on);
    * ``unseen.bin``: pairs of ``unseen_identities`` other identities of the new camera
      (the generator's held-out split of the same seed), in no training set.
    """
    from datasets.face_layout import FaceRecWriter
    from datasets.synthetic import HELDOUT, TRAIN, make_identity, render_face

    settings = {
        "seed": NEW_SEED,
        "camera_side": CAMERA_SIDE,
        "identities": identities,
        "train_images": train_images,
        "heldout_images": heldout_images,
        "unseen_identities": unseen_identities,
        "pairs_per_fold": pairs_per_fold,
    }
    meta_path = out / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("settings") == settings:
        return json.loads(meta_path.read_text())
    started = time.perf_counter()

    def image(split: int, index: int, draw: int) -> bytes:
        # the generator's stream of an identity's images, (seed, split, index, 2, draw):
        # draws past train_images are further images of the same person
        rng = np.random.default_rng([NEW_SEED, split, index, 2, draw])
        return camera(render_face(make_identity(NEW_SEED, split, index), rng))

    writer = FaceRecWriter(out)
    try:
        for label in range(identities):
            for j in range(train_images):
                writer.add(label, image(TRAIN, label, j))
        num_images, num_classes = writer.close()
    except BaseException:
        writer.abort()
        raise
    rng = np.random.default_rng([NEW_SEED, PAIR_STREAM])
    for name, split, count, first in (
        ("new", TRAIN, identities, train_images),
        ("unseen", HELDOUT, unseen_identities, 0),
    ):
        chosen, issame = pairs(rng, count, heldout_images, pairs_per_fold)
        jpegs = [image(split, who, first + k) for pair in chosen for who, k in pair]
        write_bytes(out / f"{name}.bin", pickle.dumps((jpegs, issame), protocol=4))
    meta = {
        "settings": settings,
        "num_classes": num_classes,
        "num_images": num_images,
        "pairs": 10 * pairs_per_fold,
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_bytes(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
    return meta


def _accuracy(history: list[dict[str, Any]], index: int, target: str) -> dict[str, float]:
    result = history[index]["results"][target]
    return {"accuracy": result["accuracy"], "std": result.get("accuracy_std", 0.0)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.finetune_demo", description=__doc__)
    parser.add_argument("--pretrain-data", default="data/synthetic")
    parser.add_argument("--new-data", default="data/synthetic_new")
    parser.add_argument("--out", default="work_dirs/finetune_demo")
    parser.add_argument("--pretrain-epochs", type=int, default=1)
    parser.add_argument("--new-identities", type=int, default=50)
    parser.add_argument("--train-images", type=int, default=20)
    parser.add_argument("--heldout-images", type=int, default=10)
    parser.add_argument("--unseen-identities", type=int, default=50)
    parser.add_argument("--pairs-per-fold", type=int, default=50)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.05, help="fine-tuning optimizer.lr")
    parser.add_argument("--backbone-lr-mult", type=float, default=0.5)
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for the fine-tune runs")
    parser.add_argument(
        "--max-steps", type=int, default=None, help="stop every run there (a quick smoke test)"
    )
    args = parser.parse_args(argv)

    from common.dist import distributed_command

    started = time.perf_counter()
    out = Path(args.out)
    with distributed_command() as ctx:
        import os

        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        pretrain_meta = json.loads((Path(args.pretrain_data) / "meta.json").read_text())
        new = Path(args.new_data)
        if ctx.is_main:
            meta = new_identities(
                new,
                args.new_identities,
                args.train_images,
                args.heldout_images,
                args.unseen_identities,
                args.pairs_per_fold,
            )
            print(
                f"== new identities: {meta['num_classes']} x {args.train_images} training "
                f"images; {meta['pairs']} pairs each in new.bin and unseen.bin, in {new} "
                f"({meta['seconds']} s)",
                flush=True,
            )
        ctx.barrier()
        meta = json.loads((new / "meta.json").read_text())
        common = [
            "log.tensorboard=false",
            "log.progress_bar=false",
            "checkpoint.every_steps=0",
            "data.num_workers=1",
        ]
        if args.max_steps:
            common.append(f"train.max_steps={args.max_steps}")
        _, pretrain_s = run(
            "pretraining",
            [
                *common,
                f"data.root={args.pretrain_data}",
                f"data.num_classes={pretrain_meta['num_classes']}",
                f"data.num_images={pretrain_meta['num_images']}",
                f"train.epochs={args.pretrain_epochs}",
                "eval.targets=[]",
                f"train.output={out / 'pretrain'}",
            ],
            ctx,
        )
        pretrained = out / "pretrain" / "backbone.pt"
        targets = [str(new / "new.bin"), str(new / "unseen.bin")]
        new_data = [
            *common,
            f"data.root={new}",
            f"data.num_classes={meta['num_classes']}",
            f"data.num_images={meta['num_images']}",
            f"train.epochs={args.finetune_epochs}",
            f"eval.targets={','.join(targets)}",
            "eval.every_steps=0",
        ]
        finetune = [
            f"model.init_from={pretrained}",
            f"optimizer.lr={args.lr}",
            f"optimizer.backbone_lr_mult={args.backbone_lr_mult}",
            "scheduler.warmup_epochs=0",
            *args.extra,
        ]
        runs: dict[str, dict[str, Any]] = {}
        # only the first run verifies before its first step: the pretrained model
        for name, extra in (
            ("fine-tuned, random head", [*finetune, "head.init=random", "eval.at_start=true"]),
            ("fine-tuned, imprinted head", [*finetune, "head.init=imprint", "eval.at_start=false"]),
            ("from scratch", ["eval.at_start=false"]),
        ):
            slug = name.replace(", ", "_").replace(" ", "_").replace("-", "")
            hist, seconds = run(name, [*new_data, *extra, f"train.output={out / slug}"], ctx)
            runs[name] = {"history": hist, "seconds": round(seconds, 1), "overrides": extra}
        if ctx.is_main:
            report(runs, meta, pretrain_s, args, time.perf_counter() - started, out)
    return 0


def report(
    runs: dict[str, dict[str, Any]],
    meta: dict[str, Any],
    pretrain_s: float,
    args: argparse.Namespace,
    total_s: float,
    out: Path,
) -> None:
    """Print the table and write ``finetune_demo.json``."""
    first = runs["fine-tuned, random head"]["history"]
    steps = first[-1]["step"]
    names = list(first[0]["results"])  # new, unseen
    rows = {"pretrained, before fine-tuning": {t: _accuracy(first, 0, t) for t in names}}
    for name, r in runs.items():
        rows[name] = {t: _accuracy(r["history"], -1, t) for t in names}
    print(f"\nheld-out verification after {steps} steps on {meta['num_classes']} new identities")
    titles = {"new": "new identities", "unseen": "unseen identities"}
    print(f"{'model':32s}" + "".join(f" {titles[t]:>18s}" for t in names))
    for name, acc in rows.items():
        cells = [f"{acc[t]['accuracy']:.3f} +- {acc[t]['std']:.3f}" for t in names]
        print(f"{name:32s}" + "".join(f" {c:>18s}" for c in cells))
    print(f"total {total_s:.0f} s (pretraining {pretrain_s:.0f} s)")
    write_json(
        out / "finetune_demo.json",
        {
            "new_identities": meta,
            "steps": steps,
            "settings": vars(args),
            "accuracy": rows,
            "targets": {
                "new": "pairs of held-out images of the new identities (new.bin)",
                "unseen": "pairs of other identities of the new camera (unseen.bin)",
            },
            "seconds": {
                "total": round(total_s, 1),
                "pretraining": round(pretrain_s, 1),
                **{name: r["seconds"] for name, r in runs.items()},
            },
        },
    )
    print(f"wrote {out / 'finetune_demo.json'}")


if __name__ == "__main__":
    from common.cli import run_main

    sys.exit(run_main(main, prog="tools.finetune_demo"))
