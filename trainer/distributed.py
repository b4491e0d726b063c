"""The process's place in the job: rank, world size, device, process group.

Nothing here initialises a process group (only ``train_dist.py`` does); these
helpers work the same with or without one, so a single process needs no setup.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


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
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        else:
            rank, world = 0, 1
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return cls(rank, world, local_rank, device or torch.device("cpu"), None)

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
