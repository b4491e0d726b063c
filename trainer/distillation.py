"""Distillation in the training step: the teacher's embeddings (from a frozen
:class:`~trainer.teacher.Teacher` online, or served by the loader from a cache written
by ``tools.teacher_embed``) and the :class:`partial_fc.distill.Distiller` terms,
weighted by ``distill.*``.

:class:`Distillation` is what the step sees: from the micro-batch's teacher targets
(the batch's cached rows, else the teacher's forward on its images in the student's
convention) and the student's embeddings (already scaled for DDP's averaging, as the
head gets them) it returns each term with its weight; the step adds ``weight * term``
to the loss and logs the unweighted term with the auxiliary ones
(``distill_embedding``, ``distill_relation``). Nothing is read back by the host.

The projection ``P`` (``Distiller.projection``, when the student's and the teacher's
embedding sizes differ) is replicated, outside DDP: its gradient is the full one on
every rank (see :mod:`partial_fc.distill`). It trains in its own parameter group of
the backbone optimizer (:meth:`Distillation.param_groups`: ``optimizer.lr``, without
the fine-tuning ``backbone_lr_mult``, ``optimizer.weight_decay``), is seeded by
``train.seed`` (identical on every rank) and is checkpointed as the replicated part
``distill``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from configs import OptimizerConfig
from partial_fc.distill import Distiller
from trainer.teacher import Teacher

#: The prefix of the distillation terms' names in the step's logged terms.
TERM_PREFIX = "distill_"


class Distillation:
    """A teacher, the distillation terms and their weights.

    Args:
        teacher: the frozen teacher (called on the student's images), or ``None`` when
            the loader serves cached targets with every batch.
        distiller: the terms (its ``terms()`` are the ones computed).
        weights: each term's weight, by the distiller's term name (``embedding``,
            ``relation``); a term without a weight counts 0 (logged, not trained on).
    """

    def __init__(
        self, teacher: Teacher | None, distiller: Distiller, weights: dict[str, float]
    ) -> None:
        self.teacher = teacher
        self.distiller = distiller
        self.weights = {name: float(weights.get(name, 0.0)) for name in distiller.terms()}

    def names(self) -> list[str]:
        """The logged names of the terms, in order (``distill_embedding``, ...)."""
        return [TERM_PREFIX + name for name in self.distiller.terms()]

    def params(self) -> list[nn.Parameter]:
        """The learned parameters (``P``, when the sizes differ): replicated."""
        return [p for p in self.distiller.parameters() if p.requires_grad]

    def param_groups(self, cfg: OptimizerConfig) -> list[dict[str, Any]]:
        """The backbone optimizer's extra group for ``P`` (none without ``P``)."""
        params = self.params()
        if not params:
            return []
        return [{"params": params, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's ``(b, D_t)`` fp32 embeddings of ``images`` (no autograd
        history; call it under the student's autocast).

        Raises:
            RuntimeError: there is no online teacher (a cached run's batches carry their
                targets; a batch without them is a bug of the loader).
        """
        if self.teacher is None:
            raise RuntimeError("distill.cache: a batch came without its cached teacher rows")
        return self.teacher(images)

    def __call__(
        self,
        embeddings: torch.Tensor,
        targets: torch.Tensor,
        class_centres: torch.Tensor | None = None,
    ) -> dict[str, tuple[torch.Tensor, float]]:
        """``{logged name: (unweighted term, weight)}`` for this micro-batch (0-dim
        device tensors, the global values on every rank). ``class_centres`` is the
        head's weight shard, read (detached) by the logit term."""
        terms = self.distiller(embeddings, targets, class_centres=class_centres)
        return {TERM_PREFIX + name: (term, self.weights[name]) for name, term in terms.items()}
