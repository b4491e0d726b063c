"""The train section: ``Trainer.train_step`` per network, with and without
channels_last, on random uint8 batches already on the device: img/s and peak memory."""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

import torch

from bench.common import FixedLengthLoader
from bench.gpu_check.clock import Clock
from bench.gpu_check.plan import Plan, check_cap


def train_row(
    plan: Plan, clock: Clock, network: str, channels_last: bool, output: str
) -> dict[str, Any]:
    """One network and memory format: warm-up steps, then the timed ones; its row."""
    from common.dist import DistContext
    from common.rng import seed_everything
    from configs import load_config
    from datasets.transforms import IMAGE_SIZE, normalize_batch
    from trainer.build import build_backbone, build_head
    from trainer.loop import Trainer

    device = clock.device
    batch = plan.train_batch
    steps = plan.train_warmup + plan.train_steps
    cfg = load_config(
        "ms1mv3_r50",
        [
            f"model.network={network}",
            f"data.batch_size={batch}",
            f"data.num_classes={plan.train_classes}",
            "head.matmul_dtype=bf16",
            "train.amp=bf16",
            f"train.output={output}",
            "log.tensorboard=false",
            "log.progress_bar=false",
            "checkpoint.every_steps=0",
            "eval.targets=[]",
        ],
    )
    seed_everything(cfg.train.seed)
    backbone = build_backbone(cfg)
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    head = build_head(cfg, device)
    trainer = Trainer(cfg, backbone, head, FixedLengthLoader(steps), DistContext(device=device))
    generator = torch.Generator().manual_seed(1)
    size = IMAGE_SIZE  # the loader's (and every backbone's) 112x112
    raw = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=generator)
    raw = raw.to(device)
    labels = torch.randint(0, plan.train_classes, (batch,), generator=generator).to(device)

    def step() -> Any:
        images = normalize_batch(raw)  # what the loader does on the device every batch
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return trainer.train_step([(images, labels)])

    results: list[Any] = []  # StepResults: read back only after the timed steps

    def timed_step() -> None:
        results.append(step())

    for _ in range(plan.train_warmup):
        step()
    clock.sync()
    clock.reset_peak()
    start = time.perf_counter()
    step_times = clock.time_each(timed_step, plan.train_steps)
    clock.sync()
    wall = time.perf_counter() - start
    skipped = int(torch.stack([r.skipped for r in results]).sum())
    final_loss = float(results[-1].loss)
    row = dict(
        network=network,
        channels_last=channels_last,
        batch=batch,
        classes=plan.train_classes,
        amp=trainer.amp.mode,  # "none" on the CPU: autocast runs on CUDA only
        head_matmul=cfg.head.matmul_dtype,
        timed_steps=plan.train_steps,
        img_s=plan.train_steps * batch / wall,
        median_step_s=statistics.median(step_times),
        peak_mem_gib=clock.peak_gib(),
        skipped_steps=skipped,
        final_loss=final_loss,
    )
    return row  # the trainer and the batch are freed with this frame


def run(plan: Plan, clock: Clock, deadline: float, out: dict[str, Any]) -> None:
    """Full training steps per network and memory format; appends to ``out["rows"]``."""
    if clock.cuda:
        # Fixed input shapes: let cuDNN pick the fastest convolution algorithms.
        torch.backends.cudnn.benchmark = True
    out["cudnn_benchmark"] = torch.backends.cudnn.benchmark if clock.cuda else None
    rows: list[dict[str, Any]] = out.setdefault("rows", [])
    errors: list[str] = out.setdefault("errors", [])
    for network in plan.train_networks:
        for channels_last in (False, True):
            what = f"{network}, channels_last={channels_last}"
            check_cap(deadline, what)
            with tempfile.TemporaryDirectory(prefix="gpu_check_train_") as tmp:
                try:
                    rows.append(train_row(plan, clock, network, channels_last, tmp))
                except Exception as exc:
                    # One configuration failing (e.g. out of memory) keeps the others.
                    errors.append(f"{what}: {type(exc).__name__}: {exc}")
            clock.release()
    if errors:
        raise RuntimeError("; ".join(errors))
