"""Triplet loss with online mining over the gathered global batch.

Notation: the global batch holds B samples (every rank's rows, in rank order);
``d(i, j)`` is the chosen distance; samples with a negative label are *unknown*
and are never an anchor, a positive or a negative. For an anchor ``a``, its
positives are the other samples with its label (``p != a``), its negatives the
known samples with another label. A triplet's loss is
``l(a, p, n) = max(d(a, p) - d(a, n) + margin, 0)``.

Mining rules and averaging (the loss is a mean, the same value on every rank):

``batch_all``
    Every triplet ``(a, p, n)`` of the batch. Loss = sum of ``l`` over all
    triplets / number of triplets with ``l > 0`` (the common "batch all"
    formulation: easy triplets do not dilute the mean); 0 when no triplet is
    active.
``batch_hard``  (Hermans et al., 2017)
    One triplet per anchor that has at least one positive and one negative:
    its farthest positive (largest ``d(a, p)``) and nearest negative (smallest
    ``d(a, n)``). Loss = mean of ``l`` over those anchors (zero-loss anchors count).
``semi_hard``  (FaceNet; the convention of TensorFlow-Addons' ``triplet_semihard_loss``)
    One triplet per positive pair ``(a, p)`` (ordered, so ``(p, a)`` is another
    pair) whose anchor has a negative: the nearest negative *farther* than the
    positive (smallest ``d(a, n)`` with ``d(a, n) > d(a, p)``); when there is
    none, the farthest negative. Semi-hard negatives (``d(a, p) < d(a, n) <
    d(a, p) + margin``) thus give a positive loss, easier ones give 0, and hard
    negatives are never chosen while a farther one exists. Loss = mean of ``l``
    over those pairs.

Ties (equal distances) go to the lowest global index. Gradients flow through
the distances of the selected triplets; the selection itself is not
differentiated.

Distribution: each rank mines the anchors it holds (its own rows) against the
whole gathered batch, and one all-reduce adds ``[sum of losses, count]`` over
ranks. The gradient that reaches this rank's rows (through the gather's
reduce-scatter) is the exact gradient of the global loss with respect to them,
the head's contract (a trainer scales DDP gradients by the world size once).
Per rank the work is ``O(b * B)`` distances; ``batch_all`` compares ``O(b * B^2)``
triplets in fixed-size anchor blocks under ``no_grad``, ``semi_hard`` sorts each
anchor's negative distances (``O(b * B log B)``).

No host synchronisation: the mining is written with ``(b, B)`` masks, arg-reductions
and gathers at valid (clamped) indices, and counts are tensor sums, so no shape
depends on the data and a GPU step never waits for the device
(``tests/partial_fc/test_aux_host_sync.py`` checks this).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.distributed import ProcessGroup

from common.dist import rank_and_world_size
from partial_fc._aux_common import pairwise_distance, sum_of_partials
from partial_fc.collectives import gather_for_loss

Mining = Literal["batch_all", "batch_hard", "semi_hard"]
TripletDistance = Literal["squared_euclidean", "cosine"]
_MININGS = ("batch_all", "batch_hard", "semi_hard")
_DISTANCES = ("squared_euclidean", "cosine")
# Elements of batch_all's (anchors, B, B) comparison blocks evaluated at once; the
# number of blocks depends only on the static batch sizes.
_CHUNK_ELEMENTS = 1 << 24


class TripletLoss(nn.Module):
    """``forward(local_embeddings (b, D), local_labels (b,) int64) -> loss (0-dim)``.

    The triplet loss over the global batch (every rank's samples) with the mining
    rule and averaging of the module docstring; equal to a single-process
    computation on the concatenated batch, on any world size.

    Args:
        margin: the triplet margin (>= 0).
        mining: ``"batch_all"``, ``"batch_hard"`` or ``"semi_hard"``.
        distance: ``"squared_euclidean"`` (on the raw embeddings) or ``"cosine"``
            (``1 - cos``).
        group: the process group (None: default group, or a single process).
        max_local_batch: if given, every rank pads to this size so the gather needs
            no batch-size exchange (padding rows are unknown samples).

    Attributes:
        num_triplets: 0-dim tensor, the denominator of the last forward (active
            triplets for ``batch_all``, valid anchors / pairs otherwise).
    """

    def __init__(
        self,
        margin: float,
        mining: Mining = "batch_all",
        distance: TripletDistance = "squared_euclidean",
        group: ProcessGroup | None = None,
        *,
        max_local_batch: int | None = None,
    ) -> None:
        super().__init__()
        if not margin >= 0.0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        if mining not in _MININGS:
            raise ValueError(f"mining must be one of {_MININGS}, got {mining!r}")
        if distance not in _DISTANCES:
            raise ValueError(f"distance must be one of {_DISTANCES}, got {distance!r}")
        if max_local_batch is not None and max_local_batch < 1:
            raise ValueError(f"max_local_batch must be >= 1, got {max_local_batch}")
        self.margin = float(margin)
        self.mining = mining
        self.distance = distance
        self.group = group
        self.max_local_batch = max_local_batch
        self.num_triplets = torch.zeros(())

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """``(b, D)`` embeddings and ``(b,)`` labels of this rank -> the global loss (0-dim).

        Every shape here follows from the (static) batch sizes, never from the labels
        or distances, and nothing is read back on the host: the mining works on
        ``(b, B)`` masks and picks columns with arg-reductions and gathers.
        """
        with torch.autocast(device_type=local_embeddings.device.type, enabled=False):
            embeddings, labels, sizes = gather_for_loss(
                local_embeddings,
                local_labels,
                self.group,
                pad_to=self.max_local_batch,
                param_dtype=local_embeddings.dtype,
            )
            rank, _ = rank_and_world_size(self.group)
            lo = sum(sizes[:rank])
            hi = lo + sizes[rank]
            # (b, B) distances from this rank's anchors to the whole batch.
            dist = pairwise_distance(embeddings[lo:hi], embeddings, self.distance)
            known = labels >= 0
            anchor_labels = labels[lo:hi]
            same = anchor_labels[:, None] == labels[None, :]
            valid = known[lo:hi, None] & known[None, :]
            positive = same & valid
            positive[:, lo:hi].diagonal().fill_(False)  # an anchor is not its own positive
            negative = ~same & valid
            if embeddings.shape[0] == 0:
                # Empty global batch (the same on every rank): no triplet, and no
                # column for batch_hard / semi_hard's arg-reductions to return.
                partial, count = dist.sum(), positive.sum()
            elif self.mining == "batch_all":
                partial, count = self._batch_all(dist, positive, negative)
            elif self.mining == "batch_hard":
                partial, count = self._batch_hard(dist, positive, negative)
            else:
                partial, count = self._semi_hard(dist, positive, negative)
            totals = sum_of_partials(torch.stack([partial, count.to(partial.dtype)]), self.group)
            self.num_triplets = totals[1].detach()
            return totals[0] / totals[1].clamp(min=1.0)

    def _batch_all(
        self, dist: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of ``l`` over all triplets and the number of active ones.

        Uses ``sum_{active} (d_ap - d_an + m) = sum_ap d_ap n_ap - sum_an d_an n_an + m N``
        with ``n_ap`` (``n_an``) the active triplets through that pair, counted in
        chunks without autograd, so no ``(b, B, B)`` tensor is kept for the backward.
        """
        b, B = dist.shape
        pos_weight = torch.zeros_like(dist)
        neg_weight = torch.zeros_like(dist)
        step = max(1, _CHUNK_ELEMENTS // max(B * B, 1))
        with torch.no_grad():
            d = dist.detach()
            for s in range(0, b, step):
                e = min(b, s + step)
                loss = d[s:e, :, None] - d[s:e, None, :] + self.margin
                active = (loss > 0) & positive[s:e, :, None] & negative[s:e, None, :]
                pos_weight[s:e] = active.sum(dim=2).to(dist.dtype)
                neg_weight[s:e] = active.sum(dim=1).to(dist.dtype)
        count = pos_weight.sum()
        partial = (dist * (pos_weight - neg_weight)).sum() + self.margin * count
        return partial, count

    def _batch_hard(
        self, dist: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Farthest positive and nearest negative per anchor that has both.

        ``dist, positive, negative (b, B)``. Every anchor row is evaluated (its argmax
        and argmin are valid column indices even when it has no positive or no
        negative); the anchors without both are masked out of the sum and the count,
        so nothing depends on the data's shape and nothing is read on the host.
        """
        with torch.no_grad():
            d = dist.detach()
            inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
            hardest_pos = torch.where(positive, d, -inf).argmax(dim=1, keepdim=True)  # (b, 1)
            hardest_neg = torch.where(negative, d, inf).argmin(dim=1, keepdim=True)  # (b, 1)
            valid = positive.any(dim=1) & negative.any(dim=1)  # (b,)
        d_ap = dist.gather(1, hardest_pos).squeeze(1)
        d_an = dist.gather(1, hardest_neg).squeeze(1)
        # where (not a multiplication) so the masked anchors' gradient is exactly 0.
        loss = torch.where(valid, (d_ap - d_an + self.margin).clamp(min=0.0), 0.0)
        return loss.sum(), valid.sum()

    def _semi_hard(
        self, dist: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per positive pair: nearest negative farther than the positive, else the farthest.

        ``dist, positive, negative (b, B)``; every ``(a, p)`` entry is evaluated and
        the pairs that are not positive pairs of an anchor with a negative are masked.
        Instead of comparing every ``(a, p, n)`` (``O(b * B^2)``), each anchor's
        negative distances are sorted once (stably: equal distances keep the lowest
        index first, the tie rule) and the nearest negative farther than ``d(a, p)``
        is the first sorted one above it, found by binary search: ``O(b * B log B)``
        with static shapes. ``d(a, n) > d(a, p)`` is the same comparison either way,
        so the choice is the same.
        """
        with torch.no_grad():
            d = dist.detach().contiguous()
            B = d.shape[1]
            inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
            # (b, B): each row's negative distances ascending, the non-negatives (+inf) last.
            neg_sorted, neg_order = torch.where(negative, d, inf).sort(dim=1, stable=True)
            num_neg = negative.sum(dim=1, keepdim=True)  # (b, 1)
            # (b, B): position in the sorted row of the first distance > d(a, p).
            first_farther = torch.searchsorted(neg_sorted, d, right=True)
            has_farther = first_farther < num_neg
            nearest_farther = neg_order.gather(1, first_farther.clamp(max=B - 1))
            farthest = torch.where(negative, d, -inf).argmax(dim=1, keepdim=True)  # (b, 1)
            chosen = torch.where(has_farther, nearest_farther, farthest)  # (b, B)
            pairs = positive & (num_neg > 0)  # (b, B)
        loss = (dist - dist.gather(1, chosen) + self.margin).clamp(min=0.0)
        return torch.where(pairs, loss, 0.0).sum(), pairs.sum()

    def extra_repr(self) -> str:
        return f"margin={self.margin}, mining={self.mining!r}, distance={self.distance!r}"
