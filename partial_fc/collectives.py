"""Collectives the head needs, usable with or without an initialised process group.

With ``torch.distributed`` not initialised (plain single-process use) every
function here degrades to the identity, so the head runs the same code on one
process as on many.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from common.dist import is_distributed, rank_and_world_size

# torch 2.13 renamed the tensor-to-tensor collectives; keep older releases working.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_reduce_(
    tensor: torch.Tensor, op: dist.ReduceOp, group: ProcessGroup | None
) -> torch.Tensor:
    """All-reduce ``tensor`` in place (a no-op on one rank) and return it."""
    if is_distributed(group):
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class _GatherRows(torch.autograd.Function):
    """All-gather row blocks of different lengths; the backward sums the gradient
    over ranks and returns to each rank exactly its own rows (one reduce-scatter).

    Input ``(b_r, F)`` on rank r, output ``(sum_r b_r, F)`` in rank order.
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, sizes: list[int], group: ProcessGroup | None):
        rank, world_size = rank_and_world_size(group)
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        max_rows = max(sizes)
        padded = rows.new_zeros((max_rows, rows.shape[1]))
        padded[: rows.shape[0]] = rows
        gathered = rows.new_empty((world_size * max_rows, rows.shape[1]))
        _all_gather_single(gathered, padded, group=group)
        if all(s == max_rows for s in sizes):
            return gathered
        blocks = gathered.view(world_size, max_rows, rows.shape[1])
        return torch.cat([blocks[r, :s] for r, s in enumerate(sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sizes, world_size = ctx.sizes, len(ctx.sizes)
        max_rows = max(sizes)
        padded = grad.new_zeros((world_size, max_rows, grad.shape[1]))
        for r, block in enumerate(torch.split(grad, sizes)):
            padded[r, : sizes[r]] = block
        mine = grad.new_empty((max_rows, grad.shape[1]))
        width = grad.shape[1]  # explicit: -1 is ambiguous when every rank has 0 rows
        _reduce_scatter_single(mine, padded.view(world_size * max_rows, width), group=ctx.group)
        return mine[: sizes[ctx.rank]], None, None


PAD_LABEL = torch.iinfo(torch.int64).min
"""Label of the filler rows :func:`gather_batch` adds with ``pad_to``."""


def gather_batch(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    group: ProcessGroup | None,
    pad_to: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Gather every rank's embeddings and labels, in rank order.

    Args:
        embeddings: ``(b_local, D)`` floating tensor; ranks may hold different ``b_local``.
        labels: ``(b_local,)`` int64.
        group: the process group (``None``: the default group, or no group at all).
        pad_to: if given, every rank pads its rows to this many (labelled
            :data:`PAD_LABEL`) instead of exchanging batch sizes first, so the
            gather needs no host synchronisation.

    Returns:
        ``(embeddings (B, D), labels (B,), sizes)`` where ``B = sum(sizes)`` and
        ``sizes[r]`` is rank r's (padded) row count. The embeddings keep autograd:
        the gradient of the gathered rows flows back to the rank that owns them.

    Labels travel bit-for-bit inside the embedding gather (reinterpreted as
    floating columns), so one step costs one all-gather (plus a size exchange
    without ``pad_to``).
    """
    if embeddings.dim() != 2 or labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            "expected embeddings (B, D) and labels (B,), got "
            f"{tuple(embeddings.shape)} and {tuple(labels.shape)}"
        )
    if not is_distributed(group):
        return embeddings, labels, [embeddings.shape[0]]
    _, world_size = rank_and_world_size(group)
    labels = labels.to(torch.int64)
    if pad_to is None:
        local_size = torch.tensor(
            [embeddings.shape[0]], dtype=torch.int64, device=embeddings.device
        )
        all_sizes = local_size.new_empty(world_size)
        _all_gather_single(all_sizes, local_size, group=group)
        sizes = all_sizes.tolist()
    else:
        missing = pad_to - embeddings.shape[0]
        if missing < 0:
            raise ValueError(
                f"local batch of {embeddings.shape[0]} exceeds max_local_batch={pad_to}"
            )
        if missing:
            embeddings = torch.cat([embeddings, embeddings.new_zeros(missing, embeddings.shape[1])])
            labels = torch.cat([labels, labels.new_full((missing,), PAD_LABEL)])
        sizes = [pad_to] * world_size

    width = embeddings.shape[1]
    columns = torch.empty((), dtype=torch.int64).element_size() // embeddings.element_size()
    label_columns = labels.contiguous().view(embeddings.dtype).view(labels.shape[0], columns)
    packed = torch.cat([embeddings, label_columns], dim=1)
    gathered = _GatherRows.apply(packed, sizes, group)
    all_labels = gathered[:, width:].detach().contiguous().view(torch.int64).view(-1)
    return gathered[:, :width], all_labels, sizes


def gather_for_loss(
    local_embeddings: torch.Tensor,
    local_labels: torch.Tensor,
    group: ProcessGroup | None,
    pad_to: int | None = None,
    embedding_size: int | None = None,
    param_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """:func:`gather_batch` for a loss computed in at least fp32 (call it, and the
    loss, with autocast disabled). Checks that the embeddings are ``(b, D)`` (with
    ``D = embedding_size`` when given) and casts them to
    ``promote_types(param_dtype, float32)`` before the gather, so the gathered
    embeddings and their gradient keep that precision whatever the backbone's
    autocast produced."""
    width = "D" if embedding_size is None else str(embedding_size)
    if local_embeddings.dim() != 2 or (
        embedding_size is not None and local_embeddings.shape[1] != embedding_size
    ):
        raise ValueError(
            f"expected embeddings of shape (batch, {width}), got {tuple(local_embeddings.shape)}"
        )
    if (
        local_labels.is_floating_point()
        or local_labels.is_complex()
        or (local_labels.dtype == torch.bool)
    ):
        # A float label would be truncated (and NaN would become the padding label,
        # silently ignoring the sample): class ids must arrive as integers.
        raise TypeError(
            f"labels must be an integer tensor of class ids, got dtype {local_labels.dtype}"
        )
    compute_dtype = torch.promote_types(param_dtype, torch.float32)
    return gather_batch(
        local_embeddings.to(compute_dtype), local_labels.to(torch.int64), group, pad_to=pad_to
    )
