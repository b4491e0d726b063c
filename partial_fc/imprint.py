"""Weight imprinting: class centres from the mean embedding of each class's images.

Definition (Qi et al., "Low-Shot Learning with Imprinted Weights", CVPR 2018): the
imprinted centre of class c is

    w_c = normalize( sum_{i: y_i = c} normalize(f(x_i)) )

the L2-normalised mean of the class's L2-normalised embeddings (the direction of the
mean; the 1/n_c factor cancels in the normalisation). With K sub-centres, sub-centre 0
is ``w_c`` and sub-centre ``k >= 1`` is ``normalize(w_c + SUBCENTER_JITTER *
normalize(r_k))`` where ``r_k`` is that row's own random initial value
(:meth:`PartialFC.reset_parameters`, seeded and world-size independent): identical
sub-centres would tie in the max over sub-centres, so only the first would ever
receive a gradient; the nudge (about 3 degrees) breaks the tie deterministically while
keeping every sub-centre near the class mean. Classes with no image keep their
random centre.

The head uses only the direction of a row (its logits are cosines); a row's norm sets
how far a step turns it (the gradient of a cosine scales with ``1 / ||w||``). An
imprinted row therefore keeps the norm of its random initialisation, ``||r||``
(about ``0.01 * sqrt(D)``): ``stored row = ||r|| * w_c``, and ``head.init`` changes
where the centres point, not how fast they learn. (Unit rows would be about 4.4x
longer at D=512 and turn about 20x slower; in the fine-tuning demo they trained
worse than random centres, these as well or better.)

Distribution (:class:`ImprintAccumulator`): every rank embeds its own part of the
training data and calls :meth:`~ImprintAccumulator.add` once per batch (the same number
of times on every rank); each call all-gathers the global batch's normalised
embeddings and labels (:func:`partial_fc.collectives.gather_batch`, the all-gather a
training step of the head makes) and every rank adds the rows of the classes it owns
(:func:`partial_fc.sharding.class_range`) into a ``(num_local, D)`` sum. Memory per
rank is the head shard's size plus one gathered batch, whatever the number of classes;
the alternative, per-class sums reduce-scattered to their owners, needs a dense
``(C, D)`` accumulator on every rank (4 GB at 2M classes x 512 in fp32) or several
passes over the data. The traffic is that of one training epoch's gathers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from common.dist import rank_and_world_size
from partial_fc.collectives import PAD_LABEL, gather_batch
from partial_fc.sharding import class_range

#: Size of the nudge that separates sub-centres ``k >= 1`` from the imprinted mean
#: (a unit random direction times this, before re-normalising: about 2.9 degrees).
SUBCENTER_JITTER = 0.05

_EPS = 1e-12


class ImprintAccumulator:
    """Per-class sums of normalised embeddings for this rank's class shard.

    Args:
        num_classes: C over all ranks.
        embedding_size: D.
        group: the process group the classes are sharded over (``None``: the default
            group, or one process).
        pad_to: every rank's largest batch; given, each :meth:`add` pads to it and skips
            the exchange of batch sizes (as the head's ``max_local_batch``).
        device: of the sums (the embeddings' device).

    Attributes:
        class_start, num_local: this rank's classes ``[class_start, class_start +
            num_local)``.
        sums: ``(num_local, D)`` float32, the sum of the normalised embeddings per class.
        counts: ``(num_local,)`` int64, images per class seen so far.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        group: ProcessGroup | None = None,
        *,
        pad_to: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        rank, world_size = rank_and_world_size(group)
        self.num_classes = num_classes
        self.group = group
        self.pad_to = pad_to
        self.class_start, self.num_local = class_range(num_classes, rank, world_size)
        self.sums = torch.zeros(self.num_local, embedding_size, device=device)
        self.counts = torch.zeros(self.num_local, dtype=torch.int64, device=device)

    @torch.no_grad()
    def add(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> None:
        """Add one local batch (a collective: every rank calls it equally often).

        Args:
            embeddings: ``(b, D)`` raw embeddings (any floating dtype; normalised here in
                fp32).
            labels: ``(b,)`` integer class ids in ``[0, C)``.
            valid: ``(b,)`` bool, False for rows to leave out (a loader's wrap-around
                filler); ``None``: all rows count.
        """
        if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
            raise ValueError(
                "expected embeddings (b, D) and labels (b,), got "
                f"{tuple(embeddings.shape)} and {tuple(labels.shape)}"
            )
        labels = labels.to(torch.int64)
        if valid is not None:
            labels = torch.where(valid.to(torch.bool), labels, PAD_LABEL)
        unit = F.normalize(embeddings.float(), dim=1, eps=_EPS)
        everyone, all_labels, _ = gather_batch(unit, labels, self.group, pad_to=self.pad_to)
        local = all_labels - self.class_start
        mine = (all_labels != PAD_LABEL) & (local >= 0) & (local < self.num_local)
        # Whole-tensor update: rows of other shards add zero to row 0 (no boolean
        # indexing, whose output size would need a host sync on the GPU).
        index = torch.where(mine, local, torch.zeros_like(local))
        weight = mine.to(everyone.dtype).unsqueeze(1)
        self.sums.index_add_(0, index, everyone * weight)
        self.counts.index_add_(0, index, mine.to(torch.int64))

    def means(self) -> torch.Tensor:
        """``(num_local, D)`` imprinted centres (unit rows; zero rows for classes
        without images, see :attr:`counts`)."""
        return F.normalize(self.sums, dim=1, eps=_EPS)


@torch.no_grad()
def imprint_(weight: torch.Tensor, means: torch.Tensor, counts: torch.Tensor) -> int:
    """Write imprinted centres into a head shard's ``weight`` in place (see the module
    docstring: each row takes its imprinted direction and keeps its own norm).

    Args:
        weight: ``(num_local * K, D)``; row ``l * K + k`` is sub-centre k of local class l
            (:class:`partial_fc.PartialFC`'s layout), holding its random initial value.
        means: ``(num_local, D)`` unit rows (:meth:`ImprintAccumulator.means`).
        counts: ``(num_local,)`` images per class; classes with 0 keep their rows.

    Returns:
        the number of classes imprinted (a host read: call it once, before training).
    """
    num_local, dim = means.shape
    if weight.shape[0] % max(num_local, 1) or weight.shape[1] != dim:
        raise ValueError(
            f"weight {tuple(weight.shape)} is not (num_local * K, D) for means {tuple(means.shape)}"
        )
    if num_local == 0:
        return 0
    k = weight.shape[0] // num_local
    rows = weight.view(num_local, k, dim)
    mean = means.to(weight.dtype).unsqueeze(1)
    nudged = F.normalize(mean + SUBCENTER_JITTER * F.normalize(rows, dim=2, eps=_EPS), dim=2)
    first = torch.zeros(k, dtype=torch.bool, device=weight.device)
    first[0] = True
    imprinted = torch.where(first.view(1, k, 1), mean.expand_as(rows), nudged)
    imprinted = imprinted * rows.norm(dim=2, keepdim=True)  # the row's initial norm
    seen = (counts > 0).view(num_local, 1, 1)
    rows.copy_(torch.where(seen, imprinted, rows))
    return int((counts > 0).sum())
