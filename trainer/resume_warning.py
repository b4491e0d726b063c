"""The resume warning about the batch: what changed between the checkpoint's run and
this one (world size, per-rank batch, gradient accumulation), and whether the global
batch, hence steps per epoch and the LR schedule, changed with it.

The global batch of one optimizer step is ``data.batch_size × train.grad_accum ×
world size``; a world-size change with the per-rank batch scaled to match keeps it
(and says so), a per-rank batch change at the same world size changes it (and warns).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BatchLayout:
    """The batch layout of one run: per-rank batch, accumulation steps, ranks."""

    batch_size: int | None  # None: not recorded (an older checkpoint)
    grad_accum: int | None
    world_size: int

    @classmethod
    def from_config(cls, config: dict[str, Any] | None, world_size: int) -> BatchLayout:
        """From a saved configuration dict (``config_to_dict``), which may be missing."""
        config = config or {}
        batch = config.get("data", {}).get("batch_size")
        accum = config.get("train", {}).get("grad_accum", 1 if batch is not None else None)
        return cls(batch, accum, world_size)

    @property
    def global_batch(self) -> int | None:
        if self.batch_size is None or self.grad_accum is None:
            return None
        return self.batch_size * self.grad_accum * self.world_size

    def describe(self) -> str:
        if self.batch_size is None:
            return f"{self.world_size} ranks"
        return (
            f"data.batch_size {self.batch_size} x train.grad_accum {self.grad_accum} x "
            f"{self.world_size} ranks"
        )


def batch_change_warning(
    saved: BatchLayout, now: BatchLayout, steps_per_epoch: int, total_steps: int
) -> str | None:
    """The warning to log on resume, or ``None`` when the layout did not change."""
    if saved == now or (saved.batch_size is None and saved.world_size == now.world_size):
        return None
    assert now.global_batch is not None
    if saved.global_batch is None:  # only the world size is known
        return (
            f"world size changed {saved.world_size} -> {now.world_size}; the checkpoint does "
            f"not record its per-rank batch, so whether the global batch changed is unknown: "
            f"it is now {now.global_batch} ({now.describe()}), {steps_per_epoch} steps per "
            f"epoch, and the LR schedule spans {total_steps} steps"
        )
    if saved.global_batch == now.global_batch:
        return (
            f"batch layout changed ({saved.describe()} -> {now.describe()}); the global "
            f"batch stays {now.global_batch}, so steps per epoch ({steps_per_epoch}) and the "
            f"LR schedule ({total_steps} steps) are unchanged"
        )
    return (
        f"global batch changed {saved.global_batch} -> {now.global_batch} "
        f"({saved.describe()} -> {now.describe()}): steps per epoch change with it (now "
        f"{steps_per_epoch}) and the LR schedule now spans {total_steps} steps"
    )
