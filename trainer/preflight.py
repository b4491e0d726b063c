"""Start-up checks of the output directory: writable, and room for a checkpoint.

A run that can only fail at its first checkpoint (hours in) should fail before its
first step instead. :func:`probe_output` creates ``train.output`` if needed, writes
and removes a small probe file (what a checkpoint save does, minus the size), and
compares the free space with what one checkpoint needs. Every error names the path.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from common.outdir import OutputDirError, probe_directory


def _size(n: float) -> str:
    """A byte count in the largest binary unit that keeps it at least 1 (``3.20 GiB``,
    ``12.5 MiB``, ``900 B``): never ``0.00 GiB`` for a small checkpoint."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def probe_output(output: str | os.PathLike[str], rank: int = 0, required_bytes: int = 0) -> None:
    """Check that ``output`` is a writable directory with ``required_bytes`` free.

    Args:
        output: the run's output directory (created if missing).
        rank: used in the probe file's name, so ranks sharing the directory do not clash.
        required_bytes: free space needed (0: do not check the space).
    Raises:
        OutputDirError: naming the path and the reason (not a directory, permission,
            read-only file system, no space, ...).
    """
    path = Path(output)
    probe_directory(path, f"train.output={str(path)!r}", str(rank))
    if required_bytes > 0:
        free = shutil.disk_usage(path).free
        if free < required_bytes:
            raise OutputDirError(
                f"train.output={str(path)!r} has {_size(free)} free, but a checkpoint of this "
                f"run needs about {_size(required_bytes)}; free some space or point "
                "train.output elsewhere"
            )


def probe_tensorboard(output: str | os.PathLike[str]) -> None:
    """Check that ``<output>/tensorboard`` can be created and written (rank 0, with
    ``log.tensorboard=true``), so that the run fails at start-up with a message rather
    than in TensorBoard's event-writer thread.

    Raises:
        OutputDirError: naming the directory and ``log.tensorboard``.
    """
    path = Path(output) / "tensorboard"
    probe_directory(
        path, f"log.tensorboard=true, but {str(path)!r}", "0", "set log.tensorboard=false"
    )


def checkpoint_bytes_estimate(
    modules: list[torch.nn.Module], world_size: int, state_factor: float = 3.0
) -> int:
    """Rough size of one checkpoint: this rank's parameters and buffers times
    ``state_factor`` (weights + optimizer moments), times the world size (every rank
    writes its head shard; the backbone is counted once per rank, an over-estimate)."""
    per_rank = 0
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            per_rank += t.numel() * t.element_size()
    return int(per_rank * state_factor * world_size)
