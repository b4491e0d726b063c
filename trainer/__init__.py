"""The training loop around a DDP backbone and a Partial-FC head.

``trainer.build.build_trainer(cfg, ctx)`` assembles everything from a configuration;
:class:`trainer.loop.Trainer` can also be built from your own backbone, head and
loader. See ``docs/training.md``.
"""

from common.dist import DistContext
from trainer.loop import AuxLosses, Trainer, TrainLoader
from trainer.step import StepResult

__all__ = ["AuxLosses", "DistContext", "StepResult", "TrainLoader", "Trainer"]
