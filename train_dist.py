"""Train a face-recognition model with a Partial-FC head.

::

    python train_dist.py CONFIG [key=value ...]                      # one process
    torchrun --nproc_per_node=8 train_dist.py CONFIG [key=value ...]  # one node
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 \\
        --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train_dist.py CONFIG

CONFIG is a preset (``ms1mv2_r50``, ``configs/demo``, ...) or a ``.json``/``.toml``
file; ``key=value`` overrides any field (``optimizer.lr=0.05``). The process group
and device come from :func:`trainer.distributed.init_distributed` (``nccl`` on
``cuda:LOCAL_RANK`` when CUDA is available, ``gloo`` on CPU otherwise); the loop
lives in :class:`trainer.loop.Trainer` (see docs/training.md).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.outdir import OutputLock
    from configs import Config


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line: a config spec and ``key=value`` overrides."""
    parser = argparse.ArgumentParser(
        description="Partial-FC face-recognition training (run under torchrun for >1 rank).",
        epilog="Fields: python train_dist.py CONFIG --list-keys",
    )
    parser.add_argument("config", help="preset name, configs/<preset>, or a .json/.toml file")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument("--list-keys", action="store_true", help="print every field and exit")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = parse_args(argv)
    from configs import ConfigError, describe, load_config, save_config

    if args.list_keys:
        for key, doc in describe():
            print(f"{key:32s} {doc}")
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    from trainer.preflight import OutputDirError, probe_output

    try:  # before joining the job: an unwritable output fails every rank alike, at once
        probe_output(cfg.train.output, int(os.environ.get("RANK", "0")))
    except OutputDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    import torch
    import torch.distributed as dist

    from common.atomic import OutputWriteError
    from common.outdir import OutputLock
    from datasets import DataError
    from trainer.build import build_trainer
    from trainer.checkpoint import CheckpointError
    from trainer.distributed import init_distributed
    from trainer.loop import TrainingError
    from trainer.monitor import setup_logging

    # the collective timeout bounds every collective: a hung or dead peer makes the
    # others fail after it instead of waiting forever
    ctx = init_distributed(timeout_s=cfg.train.collective_timeout_s)
    rank, world = ctx.rank, ctx.world_size
    lock = OutputLock(cfg.train.output, "train.output", "train")
    trainer = None
    try:
        # one job per output directory: rank 0 locks it before anything is written
        refusal = _lock_output(lock, cfg) if rank == 0 else None
        refusal = ctx.broadcast_object(refusal)
        if refusal:
            if rank == 0:
                print(f"error: {refusal}", file=sys.stderr)
            elif ctx.local_rank == 0:  # one line per node
                print(f"error (rank {rank}): stopped: {refusal}", file=sys.stderr)
            return 1
        if ctx.device.type == "cuda":
            # Every batch has the same shape: let cuDNN time its algorithms once and
            # keep the fastest (the entry point owns this process-wide setting).
            torch.backends.cudnn.benchmark = True
        if not torch.cuda.is_available():
            # CPU ranks share the cores: oversubscribed OpenMP threads spin and crawl
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            threads = int(os.environ.get("OMP_NUM_THREADS", "0"))
            torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local))
        try:
            setup_logging(cfg.train.output, rank)
            if lock.stale:
                logging.getLogger("trainer").warning(
                    "took over the stale lock %s of %s (that job is gone)", lock.path, lock.stale
                )
            trainer = build_trainer(cfg, ctx)  # resumes first: a refused resume writes nothing
            if rank == 0:
                # After the resume check, so config.json describes what actually runs.
                save_config(cfg, cfg.train.output)
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return 2
        except (OutputDirError, CheckpointError, OutputWriteError, DataError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        try:
            trainer.fit()
        except (TrainingError, CheckpointError, OutputWriteError) as exc:
            print(f"error (rank {rank}): {exc}", file=sys.stderr)
            return 1
        except dist.DistError as exc:  # a collective outside a step (verification, export)
            print(f"error (rank {rank}): {_first_line(exc)} (a peer rank failed)", file=sys.stderr)
            return 1
        if rank == 0:
            print(
                f"outputs in {cfg.train.output}: config.json, train.log, tensorboard/, "
                f"checkpoints/, backbone.pt"
            )
        return 0
    finally:
        # Free the trainer (DDP's reducer, the loader, every tensor a collective may
        # still reference) while the process group and the interpreter are alive:
        # gloo work objects torn down during interpreter finalisation abort the
        # process ("terminate called without an active exception") after a good run.
        trainer = None
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
        lock.release()


def _lock_output(lock: OutputLock, cfg: Config) -> str | None:
    """Rank 0: take ``train.output``'s lock, then check TensorBoard's directory; the
    refusal (naming the other job, or the directory) or ``None``."""
    from common.outdir import OutputLockedError
    from trainer.preflight import OutputDirError, probe_tensorboard

    try:
        lock.acquire()
        if cfg.log.tensorboard:
            probe_tensorboard(cfg.train.output)
    except (OutputLockedError, OutputDirError) as exc:
        return str(exc)
    except OSError as exc:
        return f"train.output={cfg.train.output!r}: cannot take the lock {lock.path}: {exc}"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
