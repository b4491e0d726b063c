"""Pieces shared by the auxiliary losses (:mod:`partial_fc.center_loss`,
:mod:`partial_fc.triplet`): the partial-sum all-reduce and the distance functions.

Private to the loss modules (and :mod:`partial_fc.distill`); the public API is the loss
classes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from partial_fc.collectives import all_reduce_

_NORMALIZE_EPS = 1e-12


class _SumOfPartials(torch.autograd.Function):
    """Forward: all-reduce SUM of every rank's partial values. Backward: identity.

    Each rank holds a *partial* of a global sum (its share of the terms). The
    forward returns the global value on every rank; the backward hands the
    incoming gradient to this rank's partial only, so rank r's autograd graph
    yields ``d(partial_r)`` and the gather's reduce-scatter adds those up: the
    embedding rows receive the exact gradient of the global sum, once.
    """

    @staticmethod
    def forward(ctx, partial: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        return all_reduce_(partial.clone(), dist.ReduceOp.SUM, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def sum_of_partials(partial: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Global sum over ranks of ``partial`` (any shape; one all-reduce), whose gradient
    flows only into this rank's ``partial`` (see :class:`_SumOfPartials`)."""
    return _SumOfPartials.apply(partial, group)


def rowwise_distance(x: torch.Tensor, y: torch.Tensor, distance: str) -> torch.Tensor:
    """Distance between matching rows: ``x, y (n, D) -> (n,)``.

    ``squared_euclidean``: ``|x - y|^2``; ``euclidean``: ``|x - y|`` (gradient 0 at
    ``x == y``, PyTorch's norm subgradient); ``cosine``: ``1 - cos(x, y)``.
    """
    if distance == "squared_euclidean":
        return (x - y).pow(2).sum(dim=1)
    if distance == "euclidean":
        return torch.linalg.vector_norm(x - y, dim=1)
    if distance == "cosine":
        xn = F.normalize(x, dim=1, eps=_NORMALIZE_EPS)
        yn = F.normalize(y, dim=1, eps=_NORMALIZE_EPS)
        return 1.0 - (xn * yn).sum(dim=1)
    raise ValueError(f"unknown distance {distance!r}")


def pairwise_distance(x: torch.Tensor, y: torch.Tensor, distance: str) -> torch.Tensor:
    """All-pairs distance: ``x (n, D), y (m, D) -> (n, m)``, by matrix products.

    ``squared_euclidean``: ``|x|^2 + |y|^2 - 2 x.y``, clamped at 0 (rounding can make
    it slightly negative for near-identical rows); ``cosine``: ``1 - x^.y^``.
    """
    if distance == "squared_euclidean":
        sq = (x * x).sum(dim=1, keepdim=True) + (y * y).sum(dim=1)[None, :] - 2.0 * (x @ y.T)
        return sq.clamp(min=0.0)
    if distance == "cosine":
        xn = F.normalize(x, dim=1, eps=_NORMALIZE_EPS)
        yn = F.normalize(y, dim=1, eps=_NORMALIZE_EPS)
        return 1.0 - xn @ yn.T
    raise ValueError(f"unknown distance {distance!r}")
