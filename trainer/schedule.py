"""Learning-rate schedule: linear warm-up from a small LR, then polynomial decay.

The multiplier of optimizer step ``t`` (0-based, the LR used *by* step ``t``) is

* ``start + (1 - start) * t / warmup`` for ``t < warmup``: step 0 already trains,
  at ``start * lr`` (``scheduler.warmup_start_factor``), never at exactly 0;
* ``(1 - (t - warmup) / (total - warmup)) ** power`` afterwards, reaching 0 at
  ``t = total``.

Total and warm-up steps are derived by the trainer from the data size and the
config; they live in this object, not in the configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WarmupPoly:
    """Picklable LR multiplier ``step -> factor`` for :class:`torch.optim.lr_scheduler.LambdaLR`.

    Attributes:
        total_steps: optimizer steps of the whole run.
        warmup_steps: steps of linear warm-up (0 disables it).
        start_factor: multiplier at step 0 when warming up.
        power: exponent of the polynomial decay.
    """

    total_steps: int
    warmup_steps: int
    start_factor: float
    power: float

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(
                f"warm-up ({self.warmup_steps} steps) must be shorter than the run "
                f"({self.total_steps} steps): lower scheduler.warmup_epochs"
            )

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_factor + (1.0 - self.start_factor) * step / self.warmup_steps
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return max(0.0, 1.0 - progress) ** self.power


def build_schedulers(
    optimizers: list[torch.optim.Optimizer], rule: WarmupPoly
) -> list[torch.optim.lr_scheduler.LambdaLR]:
    """One ``LambdaLR`` per optimizer, all driven by the same rule (stepped together)."""
    return [torch.optim.lr_scheduler.LambdaLR(opt, rule) for opt in optimizers]
