"""Cost of the batched augmentation stage against a demo training step.

Builds the demo configuration's model in this process (``configs/demo``: ``mbf_tiny``,
512-d embeddings, 400 classes, ArcFace, SGD, 32 images per rank) with one torch thread,
as each of the demo's two CPU ranks runs, and times on the same random batch of
``(32, 3, 112, 112)`` images in [-1, 1]:

  * ``Trainer.train_step`` (backbone forward + backward, head, both optimizers), one
    rank, no DDP and no loader: a slightly *shorter* step than the demo's, so the ratio
    printed is, if anything, an overestimate;
  * :class:`datasets.augment.BatchAugment` with AdaFace's probabilities (crop, low
    resolution and photometric at 0.2, no erasing), and with every stage at probability 1
    (the worst case: every sample through every stage);

interleaved (one of each per round, so load from other processes hits both alike),
medians over the rounds.

    .venv/bin/python -m bench.bench_augment [--rounds 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from typing import TYPE_CHECKING

import torch

from bench.common import FixedLengthLoader, seconds_of
from datasets.augment import BatchAugment

if TYPE_CHECKING:
    from configs import Config
    from trainer.loop import Trainer

BATCH = 32


def _demo_trainer(output: str) -> tuple[Config, Trainer]:
    from backbones.registry import get_model
    from common.dist import DistContext
    from configs import load_config
    from trainer.build import build_head
    from trainer.loop import Trainer

    cfg = load_config(
        "demo",
        [
            f"train.output={output}",
            "eval.at_start=false",
            "log.tensorboard=false",
            "log.progress_bar=false",
            "checkpoint.every_steps=0",
        ],
    )
    ctx = DistContext.current()
    torch.manual_seed(0)
    backbone = get_model(cfg.model.network, embedding_size=cfg.model.embedding_size)
    head = build_head(cfg, ctx.device)
    return cfg, Trainer(cfg, backbone, head, FixedLengthLoader(1000), ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (demo: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    images = torch.rand(BATCH, 3, 112, 112, generator=g) * 2 - 1
    adaface = BatchAugment(crop_prob=0.2, lowres_prob=0.2, photometric_prob=0.2)
    every = BatchAugment(1.0, 1.0, 1.0, 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, trainer = _demo_trainer(tmp)
        labels = torch.randint(cfg.data.num_classes, (BATCH,), generator=g)
        times: dict[str, list[float]] = {"step": [], "adaface": [], "every": []}
        for i in range(args.warmup + args.rounds):
            round_times = {
                "step": seconds_of(lambda: trainer.train_step([(images, labels)])),
                "adaface": seconds_of(lambda i=i: adaface(images, step=i, rank=0, seed=0)),
                "every": seconds_of(lambda i=i: every(images, step=i, rank=0, seed=0)),
            }
            if i >= args.warmup:
                for key, value in round_times.items():
                    times[key].append(value)
    med = {key: statistics.median(values) for key, values in times.items()}
    print(
        f"\n{cfg.model.network}, batch {BATCH} x 3 x 112 x 112, {args.threads} torch "
        f"thread(s), {args.rounds} rounds (median)\n"
    )
    print("| what | ms | / training step |")
    print("|---|---|---|")
    print(f"| demo training step (`Trainer.train_step`, 1 rank) | {1e3 * med['step']:.1f} | 1 |")
    for key, label in (
        ("adaface", "augmentation, AdaFace probabilities (0.2, 0.2, 0.2, erase 0)"),
        ("every", "augmentation, every stage at probability 1"),
    ):
        print(f"| {label} | {1e3 * med[key]:.1f} | {100 * med[key] / med['step']:.1f}% |")


if __name__ == "__main__":
    main()
