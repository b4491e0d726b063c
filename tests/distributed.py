"""Run a function on several CPU ranks joined by a gloo process group.

Tests call :func:`run_ranks` with a module-level function; it is executed as
``fn(rank, world_size, *args)`` in ``world_size`` spawned processes and the
per-rank return values come back as a list ordered by rank. Spawning costs a
torch import per process, so tests should run a whole matrix of cases inside
one call rather than one call per case.

With ``PFC_TEST_DEVICE=cuda`` (``pytest --device cuda``, see ``tests/conftest.py``)
the ranks join an nccl group instead, rank ``r`` on GPU ``r``, and
:func:`device_under_test` names that GPU; a call for more ranks than there are GPUs
skips the calling test.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

TEST_DEVICE_ENV = "PFC_TEST_DEVICE"
"""Environment variable naming the device of the on_device tests (``cpu`` or ``cuda``)."""


def device_under_test() -> torch.device:
    """``cpu``, or with ``PFC_TEST_DEVICE=cuda`` this process's current GPU (a rank's own
    GPU inside :func:`run_ranks`). Read at call time, so spawned ranks see it too."""
    import torch

    if os.environ.get(TEST_DEVICE_ENV, "cpu") == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _worker(
    rank: int,
    world_size: int,
    init_file: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
    pg_timeout: float = 120.0,
) -> None:
    import torch
    import torch.distributed as dist

    # One intra-op thread per rank: 2 cores are shared by up to 4 ranks.
    torch.set_num_threads(1)
    cuda = os.environ.get(TEST_DEVICE_ENV, "cpu") == "cuda"
    try:
        if cuda:
            torch.cuda.set_device(rank)
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=pg_timeout),
        )
        try:
            # Plain pickle: torch's queue reducers would share tensor memory that
            # vanishes when this process exits before the parent reads it.
            results.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    pg_timeout: float = 120.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks (nccl ranks, one
    GPU each, under ``PFC_TEST_DEVICE=cuda``).

    ``pg_timeout`` is the process group's collective timeout in seconds.

    Returns the ranks' return values ordered by rank. Raises ``RuntimeError``
    with the failing rank's traceback if any rank raised or timed out; skips the
    calling test when nccl is asked for more ranks than there are GPUs.
    """
    if os.environ.get(TEST_DEVICE_ENV, "cpu") == "cuda":
        import pytest
        import torch

        if world_size > torch.cuda.device_count():
            pytest.skip(f"{world_size} nccl ranks need {world_size} GPUs")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(
                target=_worker, args=(r, world_size, init_file, fn, args, results, pg_timeout)
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        collected: dict[int, Any] = {}
        errors: list[str] = []
        try:
            for _ in range(world_size):
                # Once a rank failed the others fail soon or hang: wait briefly for
                # their reports, which often hold the root cause.
                rank, ok, value = results.get(timeout=10 if errors else timeout)
                if ok:
                    collected[rank] = pickle.loads(value)
                else:
                    errors.append(f"rank {rank} failed:\n{value}")
        except Exception as exc:  # queue.Empty: a rank hung or died silently
            missing = sorted(set(range(world_size)) - set(collected))
            errors.append(f"ranks {missing} did not report in time: {exc!r}")
        finally:
            for p in procs:
                p.join(timeout=5 if errors else 60)
                if p.is_alive():
                    p.kill()
                    p.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [collected[r] for r in range(world_size)]
