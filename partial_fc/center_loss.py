"""The generalised center loss with class centres sharded over ranks like the head.

Loss over the global batch (all ranks' samples)::

    L = (1 / B_known) * sum_{i known} max(d(f(x_i), mu_{y_i}) - r, 0)

``B_known`` counts the samples whose label is known (``>= 0``); negative labels
(out-of-distribution or unlabelled data) take no part. With no known sample the
loss is a zero that is still connected to the graph. ``r = 0`` with the squared
Euclidean distance is the original center loss of Wen et al. (ECCV 2016),
except that the factor 1/2 is not applied and the centres learn by gradient
descent instead of the paper's separate update rule.

Distribution: rank r holds the centres of classes ``class_range(C, r, W)`` (the
same ranges as :class:`partial_fc.head.PartialFC`). One step gathers the global
batch (:func:`partial_fc.collectives.gather_batch`), every rank computes the
hinge terms of the gathered samples whose labels it owns (as a masked term for
every gathered row, so nothing waits for the device and no shape depends on the
labels), and one scalar all-reduce adds them up. Memory per rank: the gathered
``(B, D)`` batch and the ``(C_local, D)`` shard; no replicated ``(C, D)`` matrix.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.distributed import ProcessGroup

from common.dist import rank_and_world_size
from partial_fc._aux_common import rowwise_distance, sum_of_partials
from partial_fc.collectives import gather_for_loss
from partial_fc.init import block_seeded_normal_
from partial_fc.sharding import class_range

CenterDistance = Literal["squared_euclidean", "euclidean", "cosine"]
_DISTANCES = ("squared_euclidean", "euclidean", "cosine")

# Centres are drawn in fixed blocks of global classes, each from its own seed (as the
# head does), so a class's initial centre does not depend on the world size.
_INIT_STREAM = 0x43454E54  # separates these draws from the head's for the same seed


class ShardedCenterLoss(nn.Module):
    """This rank's shard of the class centres and the exact global center loss.

    ``forward(local_embeddings (b, D), local_labels (b,) int64) -> loss (0-dim)``.
    Ranks may hold different ``b`` (B = their sum). The value is the same on every
    rank. The gradient reaching ``local_embeddings`` is the exact gradient of the
    global loss with respect to this rank's rows (the head's contract: a DDP
    backbone averages over ranks, so the trainer multiplies the embedding gradient
    by the world size once, for all losses together). ``centers.grad`` is the
    exact gradient of this rank's shard.

    Args:
        num_classes: C over all ranks.
        embedding_size: D.
        radius: r >= 0, the hinge radius; distances below it cost nothing.
        learnable: centres are an ``nn.Parameter`` (True) or a fixed buffer (False;
            still saved in the ``state_dict``).
        magnitude: scale of the initial centres. When ``num_classes == embedding_size``
            class c starts at ``magnitude * e_c`` (scaled identity: orthogonal,
            equidistant centres); otherwise at N(0, magnitude^2 / D) per coordinate,
            so ``|mu_c|`` is about ``magnitude``. Default 1.
        distance: ``"squared_euclidean"`` (default) ``|f - mu|^2``, ``"euclidean"``
            ``|f - mu|``, or ``"cosine"`` ``1 - cos(f, mu)``.
        group: process group the classes are sharded over (None: default group, or a
            single process).
        seed: seeds the initial centres; a class's centre depends only on
            ``(seed, class id)``, never on the world size.
        max_local_batch: if given, every rank pads its batch to this size so the
            gather needs no batch-size exchange (padding rows count as unknown).
        validate_labels: assert that every label is ``< num_classes`` with
            ``torch._assert_async`` (no host synchronisation: on CUDA a device-side
            assert, which ends the process's CUDA context; on CPU a ``RuntimeError``
            at once). ``False`` skips the check; labels ``>= num_classes`` then
            count as known but contribute no term.
        device, dtype: of the centres; the loss is computed in at least float32.

    Attributes:
        class_start, num_local: this rank's classes ``[class_start, class_start + num_local)``;
            ``centers[c - class_start]`` is class c's centre, shape ``(num_local, D)``.
        num_known: 0-dim int64 tensor, known samples in the last forward's global batch.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        radius: float = 0.0,
        learnable: bool = True,
        magnitude: float = 1.0,
        distance: CenterDistance = "squared_euclidean",
        group: ProcessGroup | None = None,
        seed: int = 0,
        *,
        max_local_batch: int | None = None,
        validate_labels: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be >= 1, got {embedding_size}")
        if not (radius >= 0.0 and math.isfinite(radius)):
            raise ValueError(f"radius must be a finite value >= 0, got {radius}")
        if not (magnitude > 0.0 and math.isfinite(magnitude)):
            raise ValueError(f"magnitude must be a finite value > 0, got {magnitude}")
        if distance not in _DISTANCES:
            raise ValueError(f"distance must be one of {_DISTANCES}, got {distance!r}")
        if max_local_batch is not None and max_local_batch < 1:
            raise ValueError(f"max_local_batch must be >= 1, got {max_local_batch}")
        self.group = group
        self.rank, self.world_size = rank_and_world_size(group)
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.class_start, self.num_local = class_range(num_classes, self.rank, self.world_size)
        self.radius = float(radius)
        self.learnable = learnable
        self.magnitude = float(magnitude)
        self.distance = distance
        self.seed = seed
        self.max_local_batch = max_local_batch
        self.validate_labels = validate_labels
        centers = torch.empty(self.num_local, embedding_size, device=device, dtype=dtype)
        if learnable:
            self.centers = nn.Parameter(centers)
        else:
            self.register_buffer("centers", centers)
        self.num_known = torch.zeros((), dtype=torch.int64, device=device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Scaled identity when C == D, else block-seeded normal draws (see the class doc)."""
        lo, hi = self.class_start, self.class_start + self.num_local
        d = self.embedding_size
        with torch.no_grad():
            if self.num_classes == d:
                eye = torch.zeros(self.num_local, d, dtype=torch.float64)
                eye[torch.arange(self.num_local), torch.arange(lo, hi)] = self.magnitude
                self.centers.copy_(eye)
                return
            block_seeded_normal_(
                self.centers, self.num_classes, lo, self.seed, self.magnitude / math.sqrt(d),
                stream=(_INIT_STREAM,), draw_dtype=torch.float64,
            )  # fmt: skip

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """``(b, D)`` embeddings and ``(b,)`` labels of this rank -> the global loss (0-dim).

        No host synchronisation and no data-dependent shape: every one of the B
        gathered rows gets a hinge term against the centre at its clamped local
        index, and the rows this rank does not own are zeroed by a mask (a
        ``torch.where``, so their gradient is exactly 0). The work is ``O(B * D)``
        whatever the labels.
        """
        with torch.autocast(device_type=local_embeddings.device.type, enabled=False):
            embeddings, labels, _ = gather_for_loss(
                local_embeddings,
                local_labels,
                self.group,
                pad_to=self.max_local_batch,
                embedding_size=self.embedding_size,
                param_dtype=self.centers.dtype,
            )
            compute_dtype = embeddings.dtype
            if self.validate_labels:
                # Asynchronous on CUDA (a device-side assert; the host does not wait),
                # a RuntimeError at once on CPU. Naming the offending label would need
                # a host read, so the message names the range only.
                torch._assert_async(
                    (labels < self.num_classes).all(),
                    f"ShardedCenterLoss: a label is outside [0, num_classes={self.num_classes}) "
                    "(negative labels mark unknown samples)",
                )
            known = labels >= 0  # (B,)
            local = labels - self.class_start
            owned = known & (local >= 0) & (local < self.num_local)  # (B,)
            # A rank without classes (num_local == 0) has no centre to gather at a
            # clamped index: it computes on zero rows (a static shape), partial = 0.
            rows = embeddings.shape[0] if self.num_local > 0 else 0
            index = torch.where(owned, local, 0)[:rows]  # (B,) in [0, num_local)
            dist = rowwise_distance(
                embeddings[:rows], self.centers.to(compute_dtype)[index], self.distance
            )  # (B,)
            hinge = (dist - self.radius).clamp(min=0.0)
            partial = torch.where(owned[:rows], hinge, 0.0).sum()
            total = sum_of_partials(partial, self.group)
            self.num_known = known.sum()
            return total / self.num_known.clamp(min=1).to(compute_dtype)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, class_start={self.class_start}, "
            f"num_local={self.num_local}, embedding_size={self.embedding_size}, "
            f"radius={self.radius}, learnable={self.learnable}, distance={self.distance!r}"
        )
