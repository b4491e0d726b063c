"""Gradient plumbing between DDP, the Partial-FC head and the optimizers.

The one place where the world-size factor lives
------------------------------------------------
The head returns the mean loss over the *global* batch and back-propagates the
exact gradient of that loss into this rank's embeddings. DDP then *averages* the
backbone gradients over the ``W`` ranks, which would divide the true gradient
(the sum of the ranks' contributions) by ``W``. :func:`scale_backbone_grad`
multiplies the gradient flowing from the head into the backbone by ``W`` so that,
after DDP's average, every backbone parameter holds the exact gradient of the
global-mean loss. The head's own gradient is not touched (it is already exact).

Clipping covers both parts: the norm is that of the concatenation of the backbone
gradient (identical on every rank after DDP) and the full, sharded head gradient
(its squared norm summed over ranks), so all ranks compute the same factor.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from common.dist import DistContext
from partial_fc.sparse_grad import grad_square_norm


def scale_backbone_grad(embeddings: torch.Tensor, world_size: int) -> torch.Tensor:
    """Return ``embeddings`` unchanged in value whose gradient is multiplied by
    ``world_size`` on its way back into the backbone (cancels DDP's averaging)."""
    if world_size == 1 or not embeddings.requires_grad:
        return embeddings
    embeddings.register_hook(lambda grad: grad * world_size)
    return embeddings


def _sum_sq(grads: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    # grad_square_norm: a sampled head's sparse gradient counts each row once, without
    # coalesce() (whose output size would make the host wait for the GPU).
    total = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        total = total + grad_square_norm(g)
    return total


def global_grad_norm(
    backbone_params: Iterable[torch.nn.Parameter],
    head_params: Iterable[torch.nn.Parameter],
    ctx: DistContext,
) -> torch.Tensor:
    """L2 norm of all backbone and head gradients of the job (a 0-dim fp32 tensor,
    identical on every rank; non-finite if any gradient is)."""
    bb = [p.grad for p in backbone_params if p.grad is not None]
    hd = [p.grad for p in head_params if p.grad is not None]
    head_sq = _sum_sq(hd, ctx.device)
    ctx.all_reduce_(head_sq)  # shards are disjoint: squared norms add up
    return (_sum_sq(bb, ctx.device) + head_sq).sqrt()


def clip_(params: Iterable[torch.nn.Parameter], total_norm: torch.Tensor, max_norm: float) -> None:
    """Scale every gradient by ``min(1, max_norm / total_norm)`` without a host sync."""
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.device))
