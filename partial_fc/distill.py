"""Knowledge-distillation losses over the gathered global batch (a pure library: no
configuration, no teacher; the trainer hands in the teacher's embeddings).

Three terms, all computed in at least fp32 (call with autocast disabled, as the head),
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
* **logit distillation** (:func:`logit_distill_loss`), when the teacher and the student
  share the class space (equal embedding sizes: the class centres live in the
  student's space): ``T^2 * mean_i KL(softmax(z_t,i) || softmax(z_s,i))`` over all
  ``C`` classes of all ranks, with ``z_s = scale * cos(s, W) / T``,
  ``z_t = scale * cos(t, W) / T`` (no margin; with K sub-centres a class's cosine is
  the max over them, as in the head) and ``W`` the student head's sharded centres.
  The softmax is the head's distributed one: each rank holds ``(B, C_local)`` blocks
  of its own class shard, never a ``C``-wide row; local maxima are all-reduced (MAX),
  then the local sums of exponentials and the teacher-weighted logit differences
  (SUM), in at least fp32, in the log domain. Each rank's gradient is its class
  shard's partial; the gather's reduce-scatter adds them up. The centres are a
  constant here (detached): their gradient belongs to the head's loss and its
  sparse, sampled optimizer (:mod:`partial_fc.optim` updates only the rows a step
  sampled, and a dense ``C_local``-row gradient from this term would defeat that), so
  the term moves the student's embeddings towards the teacher's class posterior on
  the student's current centres.

  Cost per step and rank (``B`` the global batch, ``n = C_local`` or ``chunk_classes``,
  K sub-centres): memory, one ``(B, n K)`` cosine block for each of the student and
  the teacher plus a ``(B, n)`` exponential (fp32), and the ``(B, D)`` gradient;
  compute, two ``B x D x n K`` products per chunk forward and three backward (the
  cosines are recomputed, not kept); communication, the distiller's one all-gather
  (shared with the other terms) plus two all-reduces of fp32 statistics, a MAX of
  ``(2, B)`` and a SUM of ``(3, B)`` (five ``(B,)`` vectors in all). No host sync.

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

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from common.dist import is_distributed, rank_and_world_size
from partial_fc._aux_common import sum_of_partials
from partial_fc.collectives import PAD_LABEL, all_reduce_, gather_for_loss

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


@dataclass(frozen=True)
class _LogitOptions:
    scale: float
    temperature: float
    num_subcenters: int
    chunk_classes: int
    group: ProcessGroup | None


def _chunk_cosines(
    x: torch.Tensor, centres: torch.Tensor, inv_norms: torch.Tensor, lo: int, hi: int, k: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cosines ``(B, hi - lo)`` of the unit rows ``x`` to local classes ``[lo, hi)`` (max
    over the K sub-centres) and, for K > 1, the winning sub-centre ``(B, hi - lo)``."""
    cos = (x @ centres[lo * k : hi * k].T).mul_(inv_norms[lo * k : hi * k])
    if k == 1:
        return cos, None
    best = cos.view(cos.shape[0], hi - lo, k).max(dim=2)
    return best.values, best.indices


class _LogitKL(torch.autograd.Function):
    """``T^2 * mean_i KL(p_t,i || p_s,i)`` over all ranks' classes from this rank's
    shard (see :func:`logit_distill_loss`). Inputs: the unit student rows ``u (B, D)``
    (autograd), the unit teacher rows ``v (B, D)``, the centre shard ``(C_local K, D)``
    and ``valid (B,)`` (constants). Forward: the global value (identical on every
    rank). Backward: ``dL/du`` through this rank's classes only (a partial)."""

    @staticmethod
    def forward(ctx, u, v, centres, valid, opts: _LogitOptions):
        k, chunk, a = opts.num_subcenters, opts.chunk_classes, opts.scale / opts.temperature
        num_local, b = centres.shape[0] // k, u.shape[0]
        inv_norms = torch.linalg.vector_norm(centres, dim=1).clamp_min(_EPS).reciprocal()
        # Running (this rank's) statistics: maxima m (2, B) of z_s and z_t, sums
        # S (2, B) of exp(z - m) and N (B,) of exp(z_t - m_t) (z_t - z_s).
        peak = u.new_full((2, b), -math.inf)
        sums = u.new_zeros((2, b))
        cross = u.new_zeros(b)
        for lo in range(0, num_local, chunk):
            hi = min(lo + chunk, num_local)
            # Two products, not one of the stacked rows: s == t then gives equal bits.
            zs = _chunk_cosines(u, centres, inv_norms, lo, hi, k)[0].mul_(a)
            zt = _chunk_cosines(v, centres, inv_norms, lo, hi, k)[0].mul_(a)
            new_peak = torch.maximum(peak, torch.stack([zs.amax(dim=1), zt.amax(dim=1)]))
            rescale = torch.exp(peak - new_peak)  # exp(-inf) = 0 before the first chunk
            es = torch.exp(zs - new_peak[0, :, None])
            et = torch.exp(zt - new_peak[1, :, None])
            sums = sums * rescale + torch.stack([es.sum(dim=1), et.sum(dim=1)])
            cross = cross * rescale[1] + (et * (zt - zs)).sum(dim=1)
            peak = new_peak
        global_peak = all_reduce_(peak.clone(), dist.ReduceOp.MAX, opts.group)
        # A rank without classes has peak -inf: its factor is 0 (the global peak is finite).
        factor = torch.exp(peak - global_peak)
        stats = torch.cat([sums * factor, (cross * factor[1])[None]])
        stats = all_reduce_(stats, dist.ReduceOp.SUM, opts.group)
        lse = global_peak + torch.log(stats[:2])  # (2, B): log-sum-exp of z_s and z_t
        kl = stats[2] / stats[1] + lse[0] - lse[1]
        weights = valid.to(u.dtype)
        count = weights.sum().clamp(min=1.0)
        t2 = opts.temperature * opts.temperature
        loss = t2 * torch.where(valid, kl, torch.zeros_like(kl)).sum() / count
        ctx.save_for_backward(u, v, centres, inv_norms, lse, weights / count)
        ctx.opts = opts
        return loss

    @staticmethod
    def backward(ctx, grad):
        u, v, centres, inv_norms, lse, row_weights = ctx.saved_tensors
        opts = ctx.opts
        k, chunk, a = opts.num_subcenters, opts.chunk_classes, opts.scale / opts.temperature
        num_local = centres.shape[0] // k
        # dL/dcos_s = a * dL/dz_s = a T^2 / B * valid_i * (p_s - p_t).
        coef = (grad * a * opts.temperature * opts.temperature * row_weights)[:, None]
        grad_u = torch.zeros_like(u)
        for lo in range(0, num_local, chunk):
            hi = min(lo + chunk, num_local)
            cos_s, choice = _chunk_cosines(u, centres, inv_norms, lo, hi, k)
            cos_t = _chunk_cosines(v, centres, inv_norms, lo, hi, k)[0]
            ps = torch.exp(cos_s.mul_(a) - lse[0, :, None])
            pt = torch.exp(cos_t.mul_(a) - lse[1, :, None])
            g = (ps - pt).mul_(coef)  # (B, n): dL/dcos_s of this chunk
            if choice is not None:  # to the winning sub-centre of each class
                g = g.new_zeros((*g.shape, k)).scatter_(2, choice[..., None], g[..., None])
                g = g.view(g.shape[0], -1)
            grad_u += g @ (centres[lo * k : hi * k] * inv_norms[lo * k : hi * k, None])
        return grad_u, None, None, None, None


def logit_distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    centres: torch.Tensor,
    valid: torch.Tensor,
    *,
    scale: float,
    temperature: float = 1.0,
    num_subcenters: int = 1,
    group: ProcessGroup | None = None,
    chunk_classes: int | None = None,
) -> torch.Tensor:
    """Logit distillation of the gathered global batch against this rank's centre shard.

    ``L = (T^2 / B) sum_{valid i} KL(p_t,i || p_s,i)``, ``p_x,i = softmax_c(z_x,ic)``
    over all ``C`` classes of all ranks of ``group``, ``z_s,ic = (scale / T) cos(s_i,
    W_c)``, ``z_t,ic = (scale / T) cos(t_i, W_c)`` (no margin; with K sub-centres
    ``cos(x, W_c) = max_k cos(x, W_ck)``, as in the head), ``B`` the valid count.
    Computed per row as ``KL_i = sum_c p_t,ic (z_t,ic - z_s,ic) - lse_t,i + lse_s,i``
    from distributed log-sum-exps: the local maxima are all-reduced (MAX), then the
    local sums of ``exp(z - max)`` and of ``exp(z_t - max_t)(z_t - z_s)`` (SUM). The
    order of the classes does not enter, so only this rank's rows of ``W`` are needed,
    not their class offset. Memory: ``(B, n K)`` blocks, ``n`` = ``chunk_classes``
    (default all ``C_local``); no host sync.

    Gradient (``W`` and ``t`` are constants): ``dKL_i/dz_s,ic = p_s,ic - p_t,ic``, so
    ``dL/dz_s,ic = (T^2 / B) valid_i (p_s,ic - p_t,ic)``,
    ``dL/dcos_s,ic = (scale T / B) valid_i (p_s,ic - p_t,ic)``,
    ``dL/du_i = sum_c dL/dcos_s,ic W^_c*`` (``u = s^``, ``W^_c*`` the winning unit
    sub-centre) and ``dL/ds_i = (I - u_i u_i^T) dL/du_i / |s_i|``. This rank returns
    the sum over **its** classes only; added over ranks (the gather's reduce-scatter)
    it is the exact gradient of ``L``. Called on one process with all centres it is
    the whole gradient. Padding rows (``valid`` False) get exactly zero.

    The centres are detached: their gradient is the head's (its sampled, sparse
    optimizer updates only the rows a step samples; see the module docstring).

    Args:
        student: ``(B, D)`` the gathered student rows (autograd).
        teacher: ``(B, D)`` the gathered teacher rows (no gradient).
        centres: ``(C_local * K, D)`` this rank's shard of the student head's centres
            (``PartialFC.weight``; row ``c * K + k`` is sub-centre k of local class c).
        valid: ``(B,)`` bool, False for padding rows.
        scale: the head's logit scale ``s`` (e.g. ``head.margin.scale``), > 0.
        temperature: ``T`` > 0.
        num_subcenters: K (``head.num_subcenters``).
        group: the group the classes are sharded over (the head's); ``None``: the
            default one, or none at all.
        chunk_classes: local classes per block (``None``: all of them).

    Returns:
        0-dim, the global value on every rank, in ``student``'s dtype (at least fp32).

    Raises:
        ValueError: the teacher's or the centres' embedding size differs from the
            student's (naming both), a non-positive or non-finite scale or
            temperature, or ``centres`` rows not a multiple of K.
    """
    if student.dim() != 2 or teacher.dim() != 2 or centres.dim() != 2:
        raise ValueError(
            "expected student (B, D), teacher (B, D) and centres (rows, D), got "
            f"{tuple(student.shape)}, {tuple(teacher.shape)} and {tuple(centres.shape)}"
        )
    if teacher.shape[1] != student.shape[1]:
        raise ValueError(
            f"logit distillation needs the teacher's embedding size ({teacher.shape[1]}) to "
            f"equal the student's ({student.shape[1]}): the class centres live in the "
            "student's embedding space"
        )
    if centres.shape[1] != student.shape[1]:
        raise ValueError(
            f"the class centres have embedding size {centres.shape[1]}, the student "
            f"{student.shape[1]}"
        )
    if teacher.shape[0] != student.shape[0] or valid.shape != (student.shape[0],):
        raise ValueError(
            f"expected {student.shape[0]} teacher rows and valid flags, got "
            f"{tuple(teacher.shape)} and {tuple(valid.shape)}"
        )
    for name, value in (("scale", scale), ("temperature", temperature)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"logit distillation {name} must be finite and > 0, got {value!r}")
    if not (isinstance(num_subcenters, int) and num_subcenters >= 1):
        raise ValueError(f"num_subcenters must be an integer >= 1, got {num_subcenters!r}")
    if centres.shape[0] % num_subcenters:
        raise ValueError(
            f"{centres.shape[0]} centre rows are not a multiple of num_subcenters={num_subcenters}"
        )
    if chunk_classes is not None and not (isinstance(chunk_classes, int) and chunk_classes >= 1):
        raise ValueError(f"chunk_classes must be >= 1 or None, got {chunk_classes!r}")
    num_local = centres.shape[0] // num_subcenters
    dtype = torch.promote_types(student.dtype, torch.float32)
    with torch.autocast(student.device.type, enabled=False):
        # Contiguous copies: the gathered rows are column slices of the packed
        # student|teacher rows, and equal rows at different offsets may round
        # differently in vectorised kernels; this way t == s gives a value of exactly 0.
        u = F.normalize(student.to(dtype).contiguous(), dim=1, eps=_EPS)
        v = F.normalize(teacher.detach().to(dtype).contiguous(), dim=1, eps=_EPS)
        opts = _LogitOptions(
            scale=float(scale),
            temperature=float(temperature),
            num_subcenters=num_subcenters,
            chunk_classes=max(1, chunk_classes or num_local),
            group=group,
        )
        return _LogitKL.apply(u, v, centres.detach().to(dtype), valid.to(torch.bool), opts)


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
        logit: whether to compute the logit term (:func:`logit_distill_loss`); needs
            ``teacher_dim == student_dim`` and :meth:`forward`'s ``class_centres``.
        logit_scale: the head's logit scale (``head.margin.scale``).
        temperature: the logit term's ``T``.
        num_subcenters: the head's K (``head.num_subcenters``).
        chunk_classes: the logit term's classes per block (``None``: all local ones).
        group: the process group (``None``: the default one, or none at all); with
            the logit term, the group the head's classes are sharded over.
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
        *,
        logit: bool = False,
        logit_scale: float = 64.0,
        temperature: float = 1.0,
        num_subcenters: int = 1,
        chunk_classes: int | None = None,
    ) -> None:
        super().__init__()
        if embedding is not None and embedding not in EMBEDDING_KINDS:
            raise ValueError(
                f"unknown embedding distillation kind {embedding!r}; "
                f"expected one of {EMBEDDING_KINDS}"
            )
        if student_dim < 1 or teacher_dim < 1:
            raise ValueError(f"embedding sizes must be >= 1, got {student_dim} and {teacher_dim}")
        if logit and teacher_dim != student_dim:
            raise ValueError(
                f"logit distillation needs the teacher's embedding size ({teacher_dim}) to "
                f"equal the student's ({student_dim}): the class centres live in the "
                "student's embedding space"
            )
        for name, value in (("logit_scale", logit_scale), ("temperature", temperature)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value!r}")
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.logit, self.logit_scale, self.temperature = logit, float(logit_scale), temperature
        self.num_subcenters, self.chunk_classes = num_subcenters, chunk_classes
        self.embedding, self.relation = embedding, relation
        self.group, self.max_local_batch = group, max_local_batch
        self.projection: nn.Linear | None = None
        if embedding is not None and student_dim != teacher_dim:
            self.projection = nn.Linear(student_dim, teacher_dim, bias=False)

    def terms(self) -> tuple[str, ...]:
        """The names of the terms :meth:`forward` returns, in order."""
        return (
            (("embedding",) if self.embedding else ())
            + (("relation",) if self.relation else ())
            + (("logit",) if self.logit else ())
        )

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        class_centres: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{"embedding": ..., "relation": ..., "logit": ...}`` (the enabled ones,
        unweighted, 0-dim, the global values on every rank).

        Args:
            student: ``(b, student_dim)`` this rank's student embeddings (autograd).
            teacher: ``(b, teacher_dim)`` the teacher's embeddings of the same images
                (no gradient flows into them).
            class_centres: with the logit term, this rank's shard of the student
                head's centres, ``(C_local * K, student_dim)`` (``PartialFC.weight``;
                used detached).
        """
        if self.logit and class_centres is None:
            raise ValueError("the logit term needs class_centres (the head's weight shard)")
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
            if self.logit:
                assert class_centres is not None
                out["logit"] = logit_distill_loss(
                    s_all,
                    t_all,
                    class_centres,
                    valid,
                    scale=self.logit_scale,
                    temperature=self.temperature,
                    num_subcenters=self.num_subcenters,
                    group=self.group,
                    chunk_classes=self.chunk_classes,
                )
        return out
