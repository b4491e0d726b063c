"""One training run of a demo (``make finetune-demo``, ``make distill-demo``): every
rank of the torchrun job trains ``configs/demo`` with overrides in-process."""

from __future__ import annotations

import gc
import shutil
import time
from typing import Any


def run(name: str, overrides: list[str], ctx: Any) -> tuple[list[dict[str, Any]], float]:
    """Train ``configs/demo`` with ``overrides`` into a fresh output directory (its
    resolved config saved there); returns the verification history and the wall time,
    and rank 0 prints one line with both."""
    from configs import load_config, save_config
    from trainer.build import build_trainer
    from trainer.monitor import setup_logging

    cfg = load_config("demo", overrides)
    if ctx.is_main:
        shutil.rmtree(cfg.train.output, ignore_errors=True)
    ctx.barrier()
    setup_logging(cfg.train.output, ctx.rank)
    started = time.perf_counter()
    trainer = build_trainer(cfg, ctx)
    if ctx.is_main:
        save_config(cfg, cfg.train.output)
    trainer.fit()
    history = list(trainer.history)
    trainer = None
    gc.collect()
    seconds = time.perf_counter() - started
    if ctx.is_main:
        results = history[-1]["results"] if history else {}
        tail = "".join(f", {t} accuracy {r['accuracy']:.3f}" for t, r in results.items())
        print(f"== {name}: {seconds:.0f} s{tail}", flush=True)
    return history, seconds
