"""Per-instance activation checkpointing that is safe with BatchNorm.

``torch.utils.checkpoint`` re-runs a block's forward during backward. For a
block with BatchNorm in training mode the re-run would update the running
statistics a second time (the same batch counted twice). Here the re-run
normalises with the batch statistics as usual (so the recomputed activations
are identical) but its running-statistics update goes to throw-away copies:
``running_mean``/``running_var``/``num_batches_tracked`` end up exactly as
without checkpointing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def _no_running_stat_updates(module: nn.Module) -> Iterator[None]:
    """Within the context, BatchNorm layers of ``module`` update throw-away
    copies of their running statistics; the originals are put back on exit."""
    names = ("running_mean", "running_var", "num_batches_tracked")
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{n: getattr(m, n) for n in names} for m in bns]
    try:
        for m, buffers in zip(bns, saved, strict=True):
            for n, t in buffers.items():
                if t is not None:
                    setattr(m, n, t.clone())
        yield
    finally:
        for m, buffers in zip(bns, saved, strict=True):
            for n, t in buffers.items():
                setattr(m, n, t)


def checkpointed(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply ``module`` to ``x`` with activation checkpointing.

    Shapes are those of ``module``. Gradients and BatchNorm running statistics
    are identical to a plain ``module(x)`` call; random ops (dropout, drop
    path) are replayed with the same RNG state.
    """

    def context_fn() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), _no_running_stat_updates(module)

    return checkpoint(module, x, use_reentrant=False, context_fn=context_fn)


def run_blocks(
    blocks: Iterable[nn.Module],
    x: torch.Tensor,
    use_checkpoint: bool,
) -> torch.Tensor:
    """Run ``blocks`` in order, checkpointing each one when ``use_checkpoint``
    is set and gradients are being recorded."""
    active = use_checkpoint and torch.is_grad_enabled()
    for block in blocks:
        x = checkpointed(block, x) if active else block(x)
    return x
