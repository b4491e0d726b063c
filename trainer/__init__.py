"""The training loop around a DDP backbone and a Partial-FC head.

``trainer.build.build_trainer(cfg, ctx)`` assembles everything from a configuration;
:class:`trainer.loop.Trainer` can also be built from your own backbone, head and
loader. See ``docs/training.md``.

Importing this package loads nothing else (no torch): each module is imported by name
(``from trainer.loop import Trainer``), so that ``python -m trainer.report --help``
answers fast.
"""
