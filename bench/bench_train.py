"""End-to-end training throughput against the backbone's own cost.

Trains the demo configuration (``configs/demo``: ``mbf_tiny``, 400 classes, 32
images per rank) on 2 CPU ranks with one thread each, and times on the same
ranks, on the same batch:
  * the full optimizer step (loader wait + backbone in DDP + gather + head +
    optimizers), as ``Trainer.train_step`` runs it;
  * the backbone's forward + backward alone (no DDP, no head) — the floor;
  * the time spent waiting for the loader.
The difference between the first two is the overhead of everything else.

    .venv/bin/python -m datasets.synthetic data/synthetic   # once (make demo does it)
    .venv/bin/python -m bench.bench_train [--steps 40] [--data data/synthetic]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _bench_rank(rank: int, world_size: int, args: argparse.Namespace, tmp: str) -> None:
    from common.dist import DistContext
    from configs import load_config
    from trainer.build import build_trainer

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world_size
    )
    cfg = load_config(
        "demo",
        [
            f"data.root={args.data}",
            f"train.output={tmp}/run",
            "eval.at_start=false",
            "log.tensorboard=false",
            "log.progress_bar=false",
            "checkpoint.every_steps=0",
        ],
    )
    trainer = build_trainer(cfg, DistContext.current())
    trainer.loader.set_epoch(0)
    batches = iter(trainer.loader)
    step_times, wait_times = [], []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - start
        trainer.train_step([batch])
        dist.barrier()
        if i >= args.warmup:
            step_times.append(time.perf_counter() - start)
            wait_times.append(waited)

    # The floor: this rank's backbone alone on the same batch, no DDP, no head.
    backbone = copy.deepcopy(trainer.backbone).train()
    images = batch[0]
    backbone_times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        backbone(images).sum().backward()
        dist.barrier()  # both ranks share the cores, as in training
        if i >= args.warmup:
            backbone_times.append(time.perf_counter() - start)
        backbone.zero_grad(set_to_none=True)

    if rank == 0:
        step = statistics.median(step_times)
        floor = statistics.median(backbone_times)
        wait = statistics.median(wait_times)
        global_batch = images.shape[0] * world_size
        print(
            f"\n{world_size} CPU ranks x 1 thread, {cfg.model.network}, global batch "
            f"{global_batch}, {cfg.data.num_classes} classes, {args.steps} timed steps "
            f"(median)\n"
        )
        print("| what | s/step | samples/s |")
        print("|---|---|---|")
        print(f"| training step (end to end) | {step:.3f} | {global_batch / step:.0f} |")
        print(f"| backbone forward+backward alone | {floor:.3f} | {global_batch / floor:.0f} |")
        print(f"| of which loader wait | {wait:.3f} | |")
        print(f"\noverhead beyond the backbone: {100 * (step / floor - 1):.1f}%")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/synthetic", help="synthetic dataset directory")
    parser.add_argument("--steps", type=int, default=40, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--world-size", type=int, default=2)
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.data, "train.rec")):
        raise SystemExit(
            f"{args.data}/train.rec not found: run `python -m datasets.synthetic {args.data}`"
        )
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_bench_rank, args=(args.world_size, args, tmp), nprocs=args.world_size)


if __name__ == "__main__":
    main()
