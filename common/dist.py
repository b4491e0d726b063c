"""The process's place in the job: rank, world size, device, process group.

:func:`init_distributed` is the one place that joins a torchrun job: every command
(``train_dist.py``, ``eval.verification``, ``eval.ijb``, ``tools.subcenter_cleaning``)
calls it, never at import time. It picks the device (``cuda:LOCAL_RANK`` with
``nccl`` when CUDA is available, ``cpu`` with ``gloo`` otherwise) and returns a
:class:`DistContext`; collectives then run on tensors of ``DistContext.device``.
The other helpers work the same with or without a process group, so a single
process needs no setup.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def is_distributed(group: ProcessGroup | None) -> bool:
    """True when collectives must run: a process group exists and spans more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_world_size(group: ProcessGroup | None = None) -> tuple[int, int]:
    """This process's rank in ``group`` (``None``: the default group) and the group's
    size; ``(0, 1)`` without a process group.

    The project's one rank lookup: the head, the losses, the samplers, evaluation and
    the cleaning command all ask here, so "no process group" means one rank everywhere.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


@dataclass(frozen=True)
class DistContext:
    """Rank layout and device of this process.

    Attributes:
        rank: global rank.
        world_size: number of ranks.
        local_rank: rank on this node (selects the CUDA device).
        device: device that holds this rank's model and batches.
        group: process group for collectives (``None`` = default group, if any).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group: Any = None

    @property
    def is_main(self) -> bool:
        """True on the rank that logs and writes shared files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is initialised."""
        return dist.is_available() and dist.is_initialized()

    @classmethod
    def current(cls, device: torch.device | None = None) -> DistContext:
        """Describe this process from the initialised default group (or a single rank)."""
        rank, world = rank_and_world_size(None)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return cls(rank, world, local_rank, device or torch.device("cpu"), None)

    def describe(self) -> str:
        """One line for a command's log: world size, this rank, its device and backend."""
        backend = dist.get_backend(self.group) if self.distributed else "none"
        return (
            f"rank {self.rank} of {self.world_size} (local rank {self.local_rank}) on "
            f"{self.device}, process group backend {backend}"
        )

    def barrier(self) -> None:
        """Wait for every rank (no-op on one process)."""
        if self.distributed:
            dist.barrier(group=self.group)

    def all_reduce_(self, tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
        """In-place all-reduce (sum by default); returns ``tensor``."""
        if self.distributed:
            dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=self.group)
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, ordered by rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out


def resolve_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    """The device of this rank: ``device`` if given, else ``cuda:local_rank`` / ``cpu``.

    A bare ``"cuda"`` becomes ``cuda:local_rank``: under torchrun every rank must
    drive its own GPU (NCCL refuses two ranks on one device), and ``--device cuda``
    is the natural way to ask for "the GPU". An explicit index is kept as given.

    Raises:
        ValueError: naming ``--device``, for a malformed device or a CUDA device
            that does not exist.
    """
    if device is None:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(
            f"--device {device!r} is not a device (cpu, cuda, cuda:N): {exc}"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: torch sees no CUDA device")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {device!r} means {dev} (LOCAL_RANK={local_rank}), but torch sees "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    return dev


def init_distributed(
    device: str | torch.device | None = None, timeout_s: float | None = None
) -> DistContext:
    """Join the job started by torchrun (if any) and describe this process.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (defaults: one process). The
    device is :func:`resolve_device` (``--device`` of a command, else
    ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``); a CUDA device is made
    current (``torch.cuda.set_device``), which ``all_gather_object`` and
    ``broadcast_object_list`` need under NCCL. With ``WORLD_SIZE > 1`` and no
    process group yet, the default group is initialised: ``nccl`` bound to that
    device, or ``gloo`` for a CPU device. A group that already exists (a test, or a
    caller that set one up) is used as it is.

    Args:
        device: the command's ``--device``; ``None`` picks as above.
        timeout_s: collective timeout in seconds (``train.collective_timeout_s``):
            a hung or dead peer makes the others fail after it instead of waiting
            forever; ``None`` keeps torch's default.

    Returns:
        the rank layout, the device and the default group (``group=None``).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {}
        if timeout_s is not None:
            kwargs["timeout"] = timedelta(seconds=timeout_s)
        if backend == "nccl":
            kwargs["device_id"] = dev  # eager NCCL init on this rank's GPU
        dist.init_process_group(backend, **kwargs)
    if dist.is_available() and dist.is_initialized():
        rank, world = rank_and_world_size(None)
    else:
        rank = int(os.environ.get("RANK", "0"))
    return DistContext(rank, world, local_rank, dev, None)


@contextlib.contextmanager
def distributed_command(
    device: str | torch.device | None = None, timeout_s: float | None = None
) -> Iterator[DistContext]:
    """:func:`init_distributed` for the body of a command; on exit the process group
    is destroyed if this call created it (one that existed before is left alone)."""
    existed = dist.is_available() and dist.is_initialized()
    ctx = init_distributed(device, timeout_s)
    try:
        yield ctx
    finally:
        if not existed and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
