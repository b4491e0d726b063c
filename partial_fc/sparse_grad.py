"""Row-sparse weight gradients of sampled steps, read with static shapes.

Under Partial-FC sampling the head's weight gradient is a sparse COO tensor whose
rows are the step's sampled rows (:mod:`partial_fc.softmax_ce`). One backward gives
sorted, unique rows (coalesced); gradient accumulation concatenates several such
lists, so a row used by two micro-steps appears twice and its gradient is the sum of
its entries. ``torch.Tensor.coalesce`` would merge them, but its output length
depends on the data: on a GPU the host would wait for it. :func:`row_gradients`
instead keeps every entry and gives each the total of its row, so shapes depend
only on the number of entries; an optimizer that updates every listed row
computes the same values for the copies of a row, and writing them back in any
order gives one result.
"""

from __future__ import annotations

import torch


def row_gradients(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows and per-row gradients of a row-sparse COO gradient ``(R, D)``.

    Returns:
        ``(rows (n,) int64, totals (n, D), first (n,) bool)``: for each of the ``n``
        stored entries its row, the sum of every entry of that row, and whether it is
        the row's first entry (so each row counts once in a norm). Coalesced input
        (one backward) is returned as it is.
    """
    if grad.layout != torch.sparse_coo or grad.sparse_dim() != 1:
        raise ValueError(f"expected a COO gradient with sparse rows, got {grad.layout}")
    rows, values = grad._indices()[0], grad._values()
    if grad.is_coalesced():
        return rows, values, torch.ones_like(rows, dtype=torch.bool)
    order = torch.argsort(rows, stable=True)
    rows, values = rows[order], values[order]
    positions = torch.arange(rows.shape[0], device=rows.device)
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = rows[1:] != rows[:-1]
    # Each entry's run starts at the last "first" position at or before it.
    run_start = torch.cummax(torch.where(first, positions, 0), dim=0).values
    totals = torch.zeros_like(values).index_add_(0, run_start, values)
    return rows, totals[run_start], first


def grad_square_norm(grad: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm (fp32, 0-dim) of a dense or row-sparse gradient; a row stored
    several times (accumulation) counts once, with its total."""
    if grad.layout == torch.sparse_coo:
        _, totals, first = row_gradients(grad)
        return (totals.float().pow(2).sum(dim=1) * first).sum()
    return grad.detach().float().pow(2).sum()


def grad_values(grad: torch.Tensor) -> torch.Tensor:
    """The stored values of a gradient: itself when dense, the entries when sparse
    (for elementwise checks and scaling: finiteness, unscaling, clipping)."""
    return grad._values() if grad.layout == torch.sparse_coo else grad
