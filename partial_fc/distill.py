"""Knowledge-distillation losses over the gathered global batch (a pure library: no
configuration, no teacher; the trainer hands in the teacher's embeddings).

Two terms, both computed in at least fp32 (call with autocast disabled, as the head),
with no host synchronisation (give ``max_local_batch`` so the gather exchanges no
sizes) and from **one** all-gather of the student's and the teacher's rows packed side
by side (:func:`partial_fc.collectives.gather_for_loss`, the head's gather):

* **embedding distillation** (:func:`embedding_distill_loss`): ``1 - cos(P s, t)``
  (``cosine``) or ``|P s^ - t^|^2`` of the normalised vectors (``l2``), averaged over
  the global batch. ``P`` is a learned bias-free ``nn.Linear`` when the student's and
  the teacher's embedding sizes differ, otherwise the identity.
* **relation distillation** (:func:`relation_distill_loss`): the mean squared
  difference between the student's ``(B, B)`` cosine-similarity matrix of the global
  batch and the teacher's, ``(1 / B^2) sum_ij (s^_i.s^_j - t^_i.t^_j)^2``. Dividing by
  the global ``B^2`` makes the value (and the gradient) independent of how the batch
  is split over ranks.

Gradient contract (the head's): each term's value is the global one on every rank and
the gradient that reaches a rank's own rows is that of the global loss, once (a
trainer cancels DDP's averaging by scaling the backbone's gradient by the world size).
The embedding term is computed over all ``B`` gathered rows on every rank, so ``P``'s
gradient is the full one, identical on every rank (``P`` is replicated, outside DDP,
and needs no gradient all-reduce); the gathered student rows' gradient is divided by
the world size before the gather's backward sums it over ranks. The relation term is
computed for this rank's rows against all columns (``(b, B)``, not ``(B, B)``) and the
partials are added by one scalar all-reduce whose backward is the identity, so the
gather's reduce-scatter adds the partial gradients up to the exact global one.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from common.dist import is_distributed, rank_and_world_size
from partial_fc._aux_common import sum_of_partials
from partial_fc.collectives import PAD_LABEL, gather_for_loss

EmbeddingKind = Literal["cosine", "l2"]
EMBEDDING_KINDS: tuple[str, ...] = ("cosine", "l2")

_EPS = 1e-12


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def embedding_distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, kind: EmbeddingKind
) -> torch.Tensor:
    """Mean over the ``valid`` rows of the per-row embedding distance.

    Args:
        student: ``(B, D)``, already projected (``P s``).
        teacher: ``(B, D)``; treated as a constant (no gradient is asked of it).
        valid: ``(B,)`` bool, False for padding rows (they contribute nothing).
        kind: ``cosine``: ``l_i = 1 - u_i.v_i``; ``l2``: ``l_i = |u_i - v_i|^2 =
            2 (1 - u_i.v_i)``, with ``u = s^ = s/|s|``, ``v = t^``.

    Gradient: with ``L = (1/B) sum_i l_i`` and ``B`` the valid count,
    ``dL/ds_i = -(c/B) (I - u_i u_i^T) v_i / |s_i|`` where ``c = 1`` for ``cosine`` and
    ``2`` for ``l2`` (the component of ``v_i`` orthogonal to ``u_i``; zero for padding
    rows). Rows of norm below 1e-12 are normalised with that floor (``F.normalize``).
    """
    if kind not in EMBEDDING_KINDS:
        raise ValueError(
            f"unknown embedding distillation kind {kind!r}; expected one of {EMBEDDING_KINDS}"
        )
    u = F.normalize(student, dim=1, eps=_EPS)
    v = F.normalize(teacher, dim=1, eps=_EPS)
    per_row = 1.0 - (u * v).sum(dim=1)
    if kind == "l2":
        per_row = 2.0 * per_row  # |u - v|^2 of unit vectors, without the cancellation
    weights = valid.to(per_row.dtype)
    return (per_row * weights).sum() / weights.sum().clamp(min=1.0)


def relation_distill_loss(
    student_rows: torch.Tensor,
    student_all: torch.Tensor,
    teacher_rows: torch.Tensor,
    teacher_all: torch.Tensor,
    valid_rows: torch.Tensor,
    valid_all: torch.Tensor,
) -> torch.Tensor:
    """This rank's *partial* relation loss: ``(1/B^2) sum_{i in rows, j in all}
    (u_i.u_j - v_i.v_j)^2`` over valid pairs, ``u = s^``, ``v = t^``, ``B`` the valid
    count of ``all``. With ``rows = all`` it is the whole loss.

    Gradient of the whole loss ``L = (1/B^2) |S - T|_F^2`` (``S = U U^T``,
    ``T = V V^T``, symmetric): ``dL/dU = (4/B^2) (S - T) U`` over valid rows and
    columns, and ``dL/ds_i = (I - u_i u_i^T) (dL/du_i) / |s_i|``. The partials of the
    ranks (their rows of ``S - T``) add up to it: a row block contributes
    ``(2/B^2) (S - T)_rows U`` to ``U_rows`` and ``(2/B^2) (S - T)_rows^T U_rows`` to
    every ``U_j``.
    """
    u_rows = F.normalize(student_rows, dim=1, eps=_EPS)
    u_all = F.normalize(student_all, dim=1, eps=_EPS)
    v_rows = F.normalize(teacher_rows, dim=1, eps=_EPS)
    v_all = F.normalize(teacher_all, dim=1, eps=_EPS)
    diff = u_rows @ u_all.T - v_rows @ v_all.T
    mask = valid_rows.to(diff.dtype)[:, None] * valid_all.to(diff.dtype)[None, :]
    count = valid_all.to(diff.dtype).sum().clamp(min=1.0)
    return (diff.square() * mask).sum() / (count * count)


class Distiller(nn.Module):
    """The distillation terms of one step, from the local student and teacher
    embeddings (see the module docstring for the maths and the gradient contract).

    Args:
        student_dim, teacher_dim: the embedding sizes; when they differ the
            embedding term learns ``P = nn.Linear(student_dim, teacher_dim, bias=False)``
            (initialised by ``nn.Linear``; a trainer must start every rank from the
            same ``P``, e.g. by seeding identically).
        embedding: the embedding term's kind, or ``None`` for no embedding term.
        relation: whether to compute the relation term.
        group: the process group (``None``: the default one, or none at all).
        max_local_batch: every rank pads to this many rows, so the gather needs no
            size exchange (no host sync). Without it the sizes are exchanged (one read).
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        embedding: EmbeddingKind | None = "cosine",
        relation: bool = True,
        group: ProcessGroup | None = None,
        max_local_batch: int | None = None,
    ) -> None:
        super().__init__()
        if embedding is not None and embedding not in EMBEDDING_KINDS:
            raise ValueError(
                f"unknown embedding distillation kind {embedding!r}; "
                f"expected one of {EMBEDDING_KINDS}"
            )
        if student_dim < 1 or teacher_dim < 1:
            raise ValueError(f"embedding sizes must be >= 1, got {student_dim} and {teacher_dim}")
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.embedding, self.relation = embedding, relation
        self.group, self.max_local_batch = group, max_local_batch
        self.projection: nn.Linear | None = None
        if embedding is not None and student_dim != teacher_dim:
            self.projection = nn.Linear(student_dim, teacher_dim, bias=False)

    def terms(self) -> tuple[str, ...]:
        """The names of the terms :meth:`forward` returns, in order."""
        return (("embedding",) if self.embedding else ()) + (("relation",) if self.relation else ())

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"embedding": ..., "relation": ...}`` (the enabled ones, unweighted,
        0-dim, the global values on every rank).

        Args:
            student: ``(b, student_dim)`` this rank's student embeddings (autograd).
            teacher: ``(b, teacher_dim)`` the teacher's embeddings of the same images
                (no gradient flows into them).
        """
        if teacher.dim() != 2 or teacher.shape != (student.shape[0], self.teacher_dim):
            raise ValueError(
                f"expected teacher embeddings of shape ({student.shape[0]}, {self.teacher_dim}), "
                f"got {tuple(teacher.shape)}"
            )
        b = student.shape[0]
        with torch.autocast(student.device.type, enabled=False):
            dtype = torch.promote_types(student.dtype, torch.float32)
            packed = torch.cat([student.to(dtype), teacher.detach().to(dtype)], dim=1)
            ones = torch.zeros(b, dtype=torch.int64, device=student.device)
            rows, labels, sizes = gather_for_loss(
                packed, ones, self.group, pad_to=self.max_local_batch, param_dtype=dtype
            )
            s_all, t_all = rows[:, : self.student_dim], rows[:, self.student_dim :]
            valid = labels != PAD_LABEL
            out: dict[str, torch.Tensor] = {}
            distributed = is_distributed(self.group)
            rank, world_size = rank_and_world_size(self.group) if distributed else (0, 1)
            if self.embedding is not None:
                s_emb = _ScaleGrad.apply(s_all, 1.0 / world_size) if world_size > 1 else s_all
                if self.projection is not None:
                    s_emb = F.linear(s_emb, self.projection.weight.to(dtype))
                out["embedding"] = embedding_distill_loss(s_emb, t_all, valid, self.embedding)
            if self.relation:
                start = sum(sizes[:rank])
                mine = slice(start, start + sizes[rank])
                partial = relation_distill_loss(
                    s_all[mine], s_all, t_all[mine], t_all, valid[mine], valid
                )
                out["relation"] = sum_of_partials(partial, self.group) if distributed else partial
        return out
