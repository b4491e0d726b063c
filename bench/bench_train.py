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
    .venv/bin/python -m bench.bench_train --distill [--teacher-network mbf]

``--distill`` then times the same step with distillation (embedding and relation
terms) from an online teacher (``--teacher-network``, random weights: the cost does not
depend on them) and from a cache (random rows with the data's signature), and the
teacher's bare forward on the same batches. The online teacher's cost in the step is
the online step minus the cached one (the same terms, without the forward), against
that bare forward (goal <= 1.1x); the cache's cost is the time to serve a batch's rows
(the memory-mapped lookup and the copy to the device) as a share of the cached step
(goal < 3%).
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

    if args.distill:
        _bench_distill(rank, world_size, args, tmp, cfg, statistics.median(step_times))

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


def _timed_steps(trainer, args: argparse.Namespace, teacher=None) -> tuple[float, float | None]:
    """Median step time over ``args.steps`` steps after ``args.warmup``; with a
    ``teacher``, also the median of its bare forward on each step's batch (timed right
    after the step, on the same ranks)."""
    trainer.loader.set_epoch(0)
    batches = iter(trainer.loader)
    steps, forwards = [], []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        batch = next(batches)
        trainer.train_step([batch])
        dist.barrier()
        took = time.perf_counter() - start
        if teacher is not None:
            start = time.perf_counter()
            teacher(batch[0])
            dist.barrier()
            forward = time.perf_counter() - start
        if i >= args.warmup:
            steps.append(took)
            if teacher is not None:
                forwards.append(forward)
    return statistics.median(steps), statistics.median(forwards) if forwards else None


def _bench_distill(rank, world_size, args, tmp, cfg, plain_step) -> None:
    """The demo step with distillation (embedding + relation terms) from an online
    ``args.teacher_network`` teacher and from a cache, against the plain step."""
    import numpy as np

    from backbones.registry import get_model
    from backbones.weights import save_backbone_weights
    from common.digest import sha256_file
    from common.dist import DistContext
    from configs import load_config
    from datasets.multi import open_datasets
    from datasets.teacher_cache import dataset_signature, write_cache
    from trainer.build import build_trainer

    teacher_file = f"{tmp}/teacher.pt"
    cache = f"{tmp}/cache"
    if rank == 0:
        torch.manual_seed(0)
        net = get_model(args.teacher_network, embedding_size=512)
        save_backbone_weights(net.state_dict(), teacher_file)
        # timing only: random rows with the data's true signature (what the loader
        # reads and checks is the same as for a real cache)
        dataset = open_datasets([args.data], flip=False)
        facts = {
            "teacher": "teacher.pt",
            "teacher_sha256": sha256_file(teacher_file),
            "teacher_network": args.teacher_network,
            "flip": False,
            "dataset": dataset_signature(dataset),
        }
        os.makedirs(cache)
        rows = np.random.default_rng(0).standard_normal((len(dataset), 512), np.float32)
        write_cache(cache, rows, facts)
    dist.barrier()
    common = [
        f"data.root={args.data}",
        "eval.at_start=false",
        "log.tensorboard=false",
        "log.progress_bar=false",
        "checkpoint.every_steps=0",
        "distill.embedding_weight=1",
        "distill.relation_weight=1",
    ]
    online = [
        f"train.output={tmp}/online",
        f"distill.teacher={teacher_file}",
        f"distill.teacher_network={args.teacher_network}",
    ]
    trainer = build_trainer(load_config("demo", [*common, *online]), DistContext.current())
    online_step, forward = _timed_steps(trainer, args, trainer.distill.teacher)
    del trainer
    cached = [f"train.output={tmp}/cached", f"distill.cache={cache}"]
    trainer = build_trainer(load_config("demo", [*common, *cached]), DistContext.current())
    cached_step, _ = _timed_steps(trainer, args)
    lookup = _lookup_time(trainer.loader, args)
    if rank == 0:
        print(
            f"\ndistillation, teacher {args.teacher_network} (512-d), embedding + relation "
            f"terms, {args.steps} timed steps each (median)\n"
        )
        print("| what | s/step | vs plain step |")
        print("|---|---|---|")
        print(f"| plain step | {plain_step:.3f} | 1.000 |")
        print(f"| distilled, online teacher | {online_step:.3f} | {online_step / plain_step:.3f} |")
        print(f"| distilled, cached teacher | {cached_step:.3f} | {cached_step / plain_step:.3f} |")
        print(f"| teacher's bare forward, same batch | {forward:.3f} | |")
        print(f"| cache rows of a batch: lookup + to device | {lookup:.5f} | |")
        print(
            f"\nthe online teacher's cost in the step (online - cached) / its bare forward: "
            f"{(online_step - cached_step) / forward:.2f}x (goal <= 1.1x); the cache's "
            f"rows: {100 * lookup / cached_step:.2f}% of a step (goal < 3%); the "
            f"distillation terms (cached - plain): {100 * (cached_step / plain_step - 1):+.1f}%"
        )


def _lookup_time(loader, args: argparse.Namespace) -> float:
    """Median time to serve one batch's cached rows as the loader does (the memory-mapped
    lookup of shuffled indices and the copy to the device), over ``args.steps`` draws."""
    import numpy as np

    rng = np.random.default_rng(0)
    times = []
    for _ in range(args.warmup + args.steps):
        indices = rng.integers(0, loader.targets.records, loader.batch_size)
        start = time.perf_counter()
        torch.from_numpy(loader.targets.lookup(indices)).to(loader.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[args.warmup :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/synthetic", help="synthetic dataset directory")
    parser.add_argument("--steps", type=int, default=40, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument(
        "--distill",
        action="store_true",
        help="also time distillation: an online teacher and a cached one",
    )
    parser.add_argument("--teacher-network", default="mbf", help="the online teacher")
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.data, "train.rec")):
        raise SystemExit(
            f"{args.data}/train.rec not found: run `python -m datasets.synthetic {args.data}`"
        )
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_bench_rank, args=(args.world_size, args, tmp), nprocs=args.world_size)


if __name__ == "__main__":
    main()
