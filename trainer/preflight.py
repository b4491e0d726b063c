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


class OutputDirError(OSError):
    """``train.output`` cannot hold this run's files; the message names the path."""


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


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
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"train.output={str(path)!r} cannot be created: {exc}") from None
    probe = path / f".write-probe-{rank}-{os.getpid()}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"\0" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise OutputDirError(f"train.output={str(path)!r} is not writable: {exc}") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    if required_bytes > 0:
        free = shutil.disk_usage(path).free
        if free < required_bytes:
            raise OutputDirError(
                f"train.output={str(path)!r} has {_gib(free)} free, but a checkpoint of this "
                f"run needs about {_gib(required_bytes)}; free some space or point "
                "train.output elsewhere"
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
