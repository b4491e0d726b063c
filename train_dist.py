"""Train a face-recognition model with a Partial-FC head.

::

    python train_dist.py CONFIG [key=value ...]                      # one process
    torchrun --nproc_per_node=8 train_dist.py CONFIG [key=value ...]  # one node
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 \\
        --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train_dist.py CONFIG
    srun --ntasks-per-node=8 python train_dist.py CONFIG              # Slurm, no torchrun

SIGTERM or SIGUSR1 (Slurm's ``--signal=USR1@120``, preemption) saves a checkpoint at
the next log step and exits with code 75 (:data:`trainer.preemption.PREEMPTED_EXIT_CODE`);
a rerun with ``checkpoint.resume=auto`` resumes there.

CONFIG is a preset (``ms1mv2_r50``, ``configs/demo``, ...) or a ``.json``/``.toml``
file; ``key=value`` overrides any field (``optimizer.lr=0.05``). The process group
and device come from :func:`common.dist.init_distributed` (``nccl`` on
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
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.outdir import OwnedDir
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
    """Entry point; returns the process exit code.

    Expected failures (:class:`common.errors.UserError`: a bad option, bad data, a
    checkpoint or an output directory that cannot be used; an ``OSError``) are one line
    on stderr: ``config error: ...`` (exit code 2), ``error: ...`` at start-up and
    ``error (rank N): ...`` once training runs (exit code 1; every rank that stops says
    why). Anything else is a bug and keeps its traceback."""
    args = parse_args(argv)
    from configs import describe, load_config

    if args.list_keys:
        for key, doc in describe():
            print(f"{key:32s} {doc}")
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
        from common.dist import launch_env
        from trainer.preflight import probe_output

        # before joining the job: an unwritable output fails every rank alike, at once
        # (torchrun's RANK or srun's SLURM_PROCID; bad launcher variables stop here)
        probe_output(cfg.train.output, launch_env().rank)
    except Exception as exc:
        code = _report(exc, "error")
        if code is None:
            raise
        return code
    return _run(cfg)


def _run(cfg: Config) -> int:
    """Join the job, claim ``train.output`` (rank 0), build the trainer and train."""
    import torch
    import torch.distributed as dist

    from common.dist import init_distributed
    from configs import save_config
    from trainer.build import build_trainer
    from trainer.monitor import setup_logging
    from trainer.preemption import PREEMPTED_EXIT_CODE, Preempted

    # the collective timeout bounds every collective: a hung or dead peer makes the
    # others fail after it instead of waiting forever
    ctx = init_distributed(timeout_s=cfg.train.collective_timeout_s)
    rank, world = ctx.rank, ctx.world_size
    owned: OwnedDir | None = None
    trainer = None
    where = "error"  # how this rank's error lines start: "error (rank N)" once training
    try:
        # one job per output directory, owned by training: rank 0 claims and locks it
        # before anything is written, and every rank learns whether it may go on
        refusal: str | None = None
        failure: BaseException | None = None
        if rank == 0:
            owned, refusal, failure = _claim_output(cfg)
        refusal = ctx.broadcast_object(refusal)
        if failure is not None:
            raise failure  # a bug: its traceback (the other ranks stop on the refusal)
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
        setup_logging(cfg.train.output, rank)
        if owned is not None:
            _log_claim(owned)
        trainer = build_trainer(cfg, ctx)  # resumes first: a refused resume writes nothing
        if rank == 0:
            # After the resume check, so config.json describes what actually runs.
            save_config(cfg, cfg.train.output)
        where = f"error (rank {rank})"
        trainer.preemption.install()  # SIGTERM/SIGUSR1: checkpoint, exit 75
        try:
            trainer.fit()
        finally:
            trainer.preemption.restore()
        if owned is not None:
            written = _written(cfg)
            owned.commit(*written)  # the manifest, last: the directory is complete
            print(f"outputs in {cfg.train.output}: {', '.join(written)}")
        return 0
    except Preempted as exc:  # saved at a step boundary: the requeued job resumes
        if rank == 0:
            print(f"{exc}; exit code {PREEMPTED_EXIT_CODE}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except dist.DistError as exc:  # a collective failed: a peer rank stopped
        print(f"{where}: {_first_line(exc)} (a peer rank failed)", file=sys.stderr)
        return 1
    except Exception as exc:
        code = _report(exc, where)
        if code is None:
            raise
        return code
    finally:
        # Free the trainer (DDP's reducer, the loader, every tensor a collective may
        # still reference) while the process group and the interpreter are alive:
        # gloo work objects torn down during interpreter finalisation abort the
        # process ("terminate called without an active exception") after a good run.
        trainer = None
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
        if owned is not None:
            owned.close()


def _report(exc: BaseException, where: str) -> int | None:
    """Print an expected failure as one line (``config error: ...`` for a configuration
    error, else ``<where>: ...``); its exit code, or ``None`` for a bug."""
    from common.cli import expected_failure
    from configs import ConfigError

    failure = expected_failure(exc)
    if failure is None:
        return None
    code, message = failure
    print(
        f"{'config error' if isinstance(exc, ConfigError) else where}: {message}", file=sys.stderr
    )
    return code


def _earlier_run(output: Path) -> bool:
    """Whether ``output`` holds a run of a version before ownership manifests: no
    ``.owner.json``, but the ``config.json`` and ``checkpoints/`` training writes."""
    from common.outdir import MANIFEST_NAME

    return (
        not (output / MANIFEST_NAME).exists()
        and (output / "config.json").is_file()
        and (output / "checkpoints").is_dir()
    )


def _claim_output(cfg: Config) -> tuple[OwnedDir | None, str | None, BaseException | None]:
    """Rank 0: open ``train.output`` as training's own directory (ownership manifest and
    run lock, :class:`common.outdir.OwnedDir`), then check TensorBoard's directory.
    Returns ``(the directory, None, None)``, or ``(None, refusal, None)`` naming the
    other job or what the directory holds, or ``(None, None, bug)``."""
    from common.cli import expected_failure
    from common.outdir import OwnedDir
    from trainer.preflight import probe_tensorboard

    output = Path(cfg.train.output)
    owned = OwnedDir(
        output,
        command="train",
        option="train.output",
        overwrite=cfg.train.overwrite or _earlier_run(output),
        overwrite_option="train.overwrite=true",
    )
    try:
        owned.open()
    except Exception as exc:
        failure = expected_failure(exc)
        return (None, failure[1], None) if failure else (None, "rank 0 failed", exc)
    try:
        if "tensorboard" in cfg.log.active_backends():
            probe_tensorboard(output)
    except Exception as exc:
        owned.close()
        failure = expected_failure(exc)
        return (None, failure[1], None) if failure else (None, "rank 0 failed", exc)
    return owned, None, None


def _log_claim(owned: OwnedDir) -> None:
    log = logging.getLogger("trainer")
    if owned.stale:
        assert owned.lock is not None
        log.warning(
            "took over the stale lock %s of %s (that job is gone)", owned.lock.path, owned.stale
        )
    if owned.adopted:
        log.warning(
            "%s was not made by training (or by a version before ownership manifests): "
            "writing into it (train.overwrite=true or an earlier run); files this run does "
            "not write are kept",
            owned.label,
        )


def _written(cfg: Config) -> list[str]:
    """What the run wrote into ``train.output`` (as the manifest lists it): the files
    that exist, TensorBoard's directory only when ``log.tensorboard`` is on."""
    output = Path(cfg.train.output)
    candidates = ["config.json", "train.log", "checkpoints/", "backbone.pt"]
    if "tensorboard" in cfg.log.active_backends():
        candidates.insert(2, "tensorboard/")
    if cfg.eval.targets:
        candidates.append("verification.json")
    candidates.append("bad_steps.jsonl")
    return [name for name in candidates if (output / name.rstrip("/")).exists()]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


if __name__ == "__main__":
    from common.cli import run_main

    sys.exit(run_main(main, prog="train_dist.py"))
