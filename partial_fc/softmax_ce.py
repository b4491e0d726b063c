"""Exact margin-softmax cross-entropy over classes sharded across ranks.

Shapes: B global batch, D embedding size, K sub-centres per class, and this
rank's classes in use: S (all ``num_local`` classes, or the sampled ones).

Forward. Each sample's own class is handled apart from the rest: its cosine is
a row dot product (max over its K sub-centres) and the margin turns it into the
target logit. The other classes are visited in chunks (:func:`chunk_bounds`):
for each chunk, one matrix product gives the block of cosines ``(B, chunk)``
already multiplied by ``scale / |w|`` per column, the target entries are set to
``-inf`` (excluded), and an in-place row softmax of the block yields the chunk's
log-sum-exp. Two all-reduces make the statistics global: MAX of ``[local
log-sum-exp, largest non-target logit]`` and SUM of ``[rescaled local sum,
target logit, target cosine]``. The loss is the mean over valid samples of
``logsumexp - target_logit``, in the log domain: no probability is clamped, so
no per-sample loss is capped.

Backward, without collectives. Off-target, ``d loss / d cos_ij = scale * r_i *
p_ij`` with ``p_ij = softmax_chunk_ij * exp(lse_chunk_i - lse_i)`` and ``r_i``
the sample's share of the loss gradient; the per-row factor is applied to the
``(B, D)`` operands of the two products, not to the ``(B, chunk)`` block, whose
only pass is the column factor ``1 / |w_j|``. The target entries get ``r_i *
(p_target - 1) * slope_i`` (``slope = d logit / d cos`` from the margin) as a
row-wise ``(B, D)`` update. The forward keeps the last chunk's softmax block;
the backward starts with it, frees it, and recomputes the other chunks one at a
time. The remainder chunk comes first, so the kept one is a full chunk: with
chunks of ``c`` classes the matrix products per step number ``3 + (S - c) / S``.
At most one ``(B, chunk)`` block is alive at any time.

The weight's gradient covers the rows in use and nothing else: every row of the
shard without sampling (a dense ``(C_local * K, D)`` tensor), or under sampling a
sparse COO tensor of ``S * K`` rows (sorted, unique: coalesced) and their values, as
``nn.Embedding(sparse=True)`` produces. A sampled step never allocates the shard's
``(C_local * K, D)`` gradient; :mod:`partial_fc.optim` updates the listed rows.

Inter-class filtering (Partial FC, CVPR 2022): a negative class whose cosine to
a sample exceeds ``filter_threshold`` is taken for a label conflict (the same
identity under two labels). ``filter_mode="remove"`` drops it from that
sample's softmax altogether (logit -inf, no gradient). ``"zero"`` is the
reference implementation's behaviour: the cosine is set to 0, so the entry
still adds ``exp(0)`` to the denominator, with no gradient.

Backend. With ``CEOptions.backend == "triton"`` the chunk loops give way to the fused
kernels of :mod:`partial_fc.triton_ce` (imported on first use): the non-target
statistics, and in the backward the non-target gradients, come from tiles that never
leave registers; everything else above is shared. Its options are checked by the
head (:mod:`partial_fc.backend`): K = 1, no filtering, no CurricularFace.

Relies on ``torch.softmax(x, dim=1, out=x)`` working in place (it does on the
CPU and CUDA kernels of torch 2.x; the tests compare against a dense float64
reference, so a kernel that stopped allowing it would fail them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from common.dist import rank_and_world_size
from partial_fc.batch_margins import BatchMargin, MarginBatch, TargetTerms
from partial_fc.collectives import all_reduce_
from partial_fc.margins import CombinedMargin

_NORM_EPS = 1e-12
# torch.mm(..., out_dtype=) (bf16/fp16 operands, fp32 output) exists on CUDA in recent
# releases; without it the low-precision product is rounded before the cast back.
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")
_NEG_INF = float("-inf")


@dataclass(frozen=True)
class CEOptions:
    """Per-step settings of :class:`MarginSoftmaxCE` that are not tensors."""

    margin: CombinedMargin
    step: int
    num_subcenters: int
    chunk_classes: int
    group: ProcessGroup | None
    filter_threshold: float | None = None
    filter_mode: Literal["remove", "zero"] = "remove"
    matmul_dtype: torch.dtype | None = None
    seed: int = 0
    training: bool = True
    backend: Literal["torch", "triton"] = "torch"
    triton_tiles: Any = None  # partial_fc.triton_ce.TritonTiles, or None: its defaults


class _KeptBlock(NamedTuple):
    """The forward's last chunk, handed to the backward instead of recomputed."""

    start: int
    """First class (index into the classes in use) of the chunk."""
    probs: torch.Tensor
    """``(B, w)`` the chunk's row softmax (target entries 0)."""
    choice: torch.Tensor | None
    """``(B, w)`` winning sub-centre per class (K > 1), else None."""
    conflict: torch.Tensor | None
    """``(B, w)`` filtered entries in "zero" mode (their gradient is masked), else None."""
    w_rows: torch.Tensor
    """``(w * K, D)`` the chunk's centres (a view without sampling, else the gathered
    copy: kept so the backward does not gather the same rows again)."""
    slope: torch.Tensor | None = None
    """``(B, w)`` CurricularFace: ``d logit / d (s cos)`` of each entry, else None."""


def chunk_bounds(num_used: int, chunk_classes: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each chunk of ``num_used`` classes, at most
    ``chunk_classes`` each. The remainder comes first, so the last chunk (the one
    the backward reuses instead of recomputing) is a full one."""
    if num_used <= 0:
        return []
    first = num_used % chunk_classes or min(chunk_classes, num_used)
    return [(0, first)] + [(s, s + chunk_classes) for s in range(first, num_used, chunk_classes)]


def _class_rows(classes: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of ``weight`` holding the K sub-centres of local ``classes`` ``(n,)``: ``(n * K,)``."""
    return (classes[:, None] * k + torch.arange(k, device=classes.device)).reshape(-1)


def _chunk_weight(
    weight: torch.Tensor, sampled: torch.Tensor | None, start: int, stop: int, k: int
) -> torch.Tensor:
    """Rows of classes ``[start, stop)`` of the classes in use: ``((stop-start)*K, D)``."""
    if sampled is None:
        return weight[start * k : stop * k]
    return weight.index_select(0, _class_rows(sampled[start:stop], k))


def _inverse_norms(rows: torch.Tensor) -> torch.Tensor:
    """``1 / |row|`` along the last dimension, without materialising normalised rows."""
    return torch.linalg.vector_norm(rows, dim=-1).clamp_min(_NORM_EPS).reciprocal()


def _matmul(a: torch.Tensor, b: torch.Tensor, low_precision: torch.dtype | None) -> torch.Tensor:
    """``a @ b`` in the inputs' dtype, or with both operands rounded to
    ``low_precision`` (bf16/fp16 tensor cores) and the product returned in the
    inputs' dtype. On CUDA the accumulation stays fp32 (``out_dtype``); elsewhere
    the low-precision product is rounded once more before the cast back."""
    if low_precision is None:
        return a @ b
    a_low, b_low = a.to(low_precision), b.to(low_precision)
    if a.is_cuda and _MM_OUT_DTYPE:
        return torch.mm(a_low, b_low, out_dtype=a.dtype)
    return (a_low @ b_low).to(a.dtype)


def _normalise(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norms = rows.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
    return rows / norms, norms


def _normalise_backward(grad_unit: torch.Tensor, unit: torch.Tensor, norms: torch.Tensor):
    """Gradient through ``unit = rows / |rows|``: ``(g - unit * <unit, g>) / |rows|``."""
    return (grad_unit - unit * (unit * grad_unit).sum(dim=1, keepdim=True)) / norms


def _weight_grad_(scaled_grad: torch.Tensor, w_rows: torch.Tensor, inv_norms: torch.Tensor):
    """Turn ``A = (G / |w|)^T x_hat`` ``(n, D)`` into the gradient through ``w / |w|``
    in place: ``A - w * <w, A> / |w|^2`` for every row at once. Returns ``scaled_grad``.

    The row dot products are one batched ``(n, 1, D) @ (n, D, 1)`` product: no ``(n, D)``
    temporary, and a fixed number of operators whatever ``n`` (a GPU pays per launch).
    """
    dots = torch.bmm(w_rows.unsqueeze(1), scaled_grad.unsqueeze(2)).view(-1)
    coef = dots.mul_(inv_norms).mul_(inv_norms)
    return scaled_grad.addcmul_(w_rows, coef.unsqueeze(1), value=-1.0)


def _target_cosines(
    xn: torch.Tensor, weight: torch.Tensor, target_class: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sample's cosine to the class ``target_class`` ``(B,)`` (a local class
    index into ``weight``; max over its K sub-centres): ``(cos, weight row of the
    winning sub-centre, its 1/|w|, the winning sub-centre k)``, each ``(B,)``. Row
    dots in fp32, B*K*D work."""
    rows = target_class[:, None] * k + torch.arange(k, device=xn.device)
    centres = weight[rows]  # (B, K, D)
    inv = _inverse_norms(centres)
    cos = torch.bmm(centres, xn.unsqueeze(2)).squeeze(2).mul_(inv)
    best = cos.max(dim=1)
    choice = best.indices.unsqueeze(1)
    return (
        best.values,
        rows.gather(1, choice).squeeze(1),
        inv.gather(1, choice).squeeze(1),
        best.indices,
    )


def _nontarget_logits(
    xn: torch.Tensor,
    w_rows: torch.Tensor,
    scaled_inv_norms: torch.Tensor,
    col: torch.Tensor,
    in_chunk: torch.Tensor,
    opts: CEOptions,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits ``scale * cos`` of a chunk ``(B, w)`` (max over K sub-centres; for
    K > 1 also the winning sub-centre, ``(B, w)``), with each in-chunk sample's
    target entry (column ``col``) set to -inf: the target is accounted for apart."""
    logits = _matmul(xn, w_rows.t(), opts.matmul_dtype).mul_(scaled_inv_norms)
    choice = None
    if opts.num_subcenters > 1:
        best = logits.view(logits.shape[0], -1, opts.num_subcenters).max(dim=2)
        logits, choice = best.values, best.indices
    current = logits.gather(1, col).squeeze(1)
    logits.scatter_(1, col, torch.where(in_chunk, _NEG_INF, current).unsqueeze(1))
    return logits, choice


def _filter_(logits: torch.Tensor, opts: CEOptions) -> torch.Tensor | None:
    """Inter-class filtering in place (see the module docstring); the conflict mask."""
    if opts.filter_threshold is None:
        return None
    conflict = logits > opts.filter_threshold * opts.margin.scale
    logits.masked_fill_(conflict, _NEG_INF if opts.filter_mode == "remove" else 0.0)
    return conflict


def _reweight_hard_(logits: torch.Tensor, terms: TargetTerms, scale: float) -> torch.Tensor | None:
    """CurricularFace in place: each entry with ``cos > threshold_i`` becomes
    ``s cos (t + cos)``; returns ``d logit / d (s cos)`` per entry (``t + 2 cos`` there,
    1 elsewhere), or None for other margins. Target entries are -inf: never hard."""
    if terms.hard_threshold is None:
        return None
    # Six passes over the block: compare, t + cos, mask, multiply, t + 2 cos, mask.
    easy = logits <= (scale * terms.hard_threshold)[:, None]
    factor = torch.add(terms.hard_t, logits, alpha=1.0 / scale).masked_fill_(easy, 1.0)
    logits.mul_(factor)  # s cos (t + cos) on the hard entries
    slope = torch.add(-terms.hard_t, factor, alpha=2.0, out=factor)  # t + 2 cos
    return slope.masked_fill_(easy, 1.0)


def _softmax_(logits: torch.Tensor, opts: CEOptions) -> torch.Tensor:
    """Row softmax in place. A row whose entries are all -inf (a one-class chunk
    holding the target, or everything filtered out) becomes 0, not NaN."""
    torch.softmax(logits, dim=1, out=logits)
    if logits.shape[1] == 1 or (opts.filter_threshold is not None and opts.filter_mode == "remove"):
        logits.nan_to_num_(0.0)
    return logits


def _rescaled(total: torch.Tensor, old_max: torch.Tensor, new_max: torch.Tensor) -> torch.Tensor:
    """``total * exp(old_max - new_max)``, 0 where ``total`` is 0 (its max may be -inf)."""
    return torch.where(total > 0, total * torch.exp(old_max - new_max), 0.0)


def _in_chunk(
    owned: torch.Tensor, target_col: torch.Tensor, start: int, stop: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples' targets fall in ``[start, stop)`` ``(B,)``, and their column
    in the chunk ``(B, 1)`` (clamped into the chunk for the others)."""
    in_chunk = owned & (target_col >= start) & (target_col < stop)
    return in_chunk, (target_col - start).clamp(0, stop - start - 1).unsqueeze(1)


def _target_terms(
    margin: CombinedMargin,
    target_cos: torch.Tensor,
    labels: torch.Tensor,
    owned: torch.Tensor,
    valid: torch.Tensor,
    x_norms: torch.Tensor,
    opts: CEOptions,
) -> TargetTerms:
    """The margin's target logits and gradients. A batch-aware margin sees the global
    batch's norms (every rank holds them) and, if it asks, every sample's target
    cosine: one all-reduce, as each sample's class lives on one rank."""
    if not isinstance(margin, BatchMargin):
        logit, slope = margin.target_logit(target_cos, labels, opts.step)
        return TargetTerms(logit, slope)
    global_cos = None
    if margin.needs_global_cos:
        global_cos = all_reduce_(torch.where(owned, target_cos, 0.0), dist.ReduceOp.SUM, opts.group)
    batch = MarginBatch(opts.step, opts.seed, x_norms.squeeze(1), valid, opts.training, global_cos)
    return margin.batch_target(target_cos, labels, batch)


def _norm_gradient(
    terms: TargetTerms,
    owned: torch.Tensor,
    row_scale: torch.Tensor,
    target_prob: torch.Tensor,
    grad_loss: torch.Tensor,
    opts: CEOptions,
) -> torch.Tensor | None:
    """``d loss / d |z|`` ``(B,)`` from a margin that reads the norm (MagFace): the
    target logit's share on the rank that owns the target, and the regulariser's on
    rank 0 only (the gather's backward sums the ranks' embedding gradients)."""
    grad = None
    if terms.norm_slope is not None:
        grad = torch.where(owned, row_scale * (target_prob - 1.0) * terms.norm_slope, 0.0)
    if terms.extra_norm_grad is not None and rank_and_world_size(opts.group)[0] == 0:
        extra = grad_loss * terms.extra_norm_grad
        grad = extra if grad is None else grad + extra
    return grad


class MarginSoftmaxCE(torch.autograd.Function):
    """``loss, correct = MarginSoftmaxCE.apply(embeddings, weight, sampled, target_col,
    labels, valid, options)``

    Args:
        embeddings: ``(B, D)`` gathered embeddings of the whole group (not normalised).
        weight: ``(num_local * K, D)`` this rank's class centres.
        sampled: ``(S,)`` local class indices in use, or None for all classes.
        target_col: ``(B,)`` int64, the column (index into the classes in use) of
            each sample's class where this rank owns it and the sample is valid, else -1.
        labels: ``(B,)`` global class ids (for per-class margins).
        valid: ``(B,)`` bool, False for ignored samples.
        options: :class:`CEOptions` (margin, step, K, chunk size, group, filtering).

    Returns:
        ``loss``: 0-dim, mean over valid samples of the exact cross-entropy over
        all classes of all ranks (the same value on every rank); ``correct``:
        ``(B,)`` bool, the target's cosine is the largest (top-1), non-differentiable.
    """

    @staticmethod
    def forward(
        ctx,
        embeddings: torch.Tensor,
        weight: torch.Tensor,
        sampled: torch.Tensor | None,
        target_col: torch.Tensor,
        labels: torch.Tensor,
        valid: torch.Tensor,
        opts: CEOptions,
    ):
        k, margin = opts.num_subcenters, opts.margin
        # Cast here, not before the call: autograd's cast backward cannot carry a
        # sparse gradient, so the backward returns it in the parameter's dtype itself.
        ctx.weight_dtype = weight.dtype
        weight = weight.to(embeddings.dtype)
        xn, x_norms = _normalise(embeddings)
        num_used = sampled.shape[0] if sampled is not None else weight.shape[0] // k
        bounds = chunk_bounds(num_used, opts.chunk_classes)
        owned = target_col >= 0

        # The target class of each owned sample, apart from the chunks.
        target_class = target_col.clamp(min=0)
        target_choice = torch.zeros_like(target_class)
        if num_used == 0:
            target_cos = xn.new_zeros(xn.shape[0])
            target_row = target_class
            target_inv = target_cos
        else:
            if sampled is not None:
                target_class = sampled[target_class]
            target_cos, target_row, target_inv, target_choice = _target_cosines(
                xn, weight, target_class, k
            )
        # Row of the winning sub-centre among the rows in use (the gradient's rows).
        target_pos = target_col.clamp(min=0) * k + target_choice
        terms = _target_terms(margin, target_cos, labels, owned, valid, x_norms, opts)
        target_logit, target_slope = terms.logit, terms.slope
        # Running log-sum-exp as (max, sum of exp(logit - max)), starting from the
        # target's own term; kept in the linear domain so that rounding errors stay
        # relative to the sum, however many chunks there are.
        local_max = torch.where(owned, target_logit, _NEG_INF)
        local_sum = owned.to(xn.dtype)
        max_other = xn.new_full((xn.shape[0],), _NEG_INF)  # largest non-target logit
        chunk_stats: list[torch.Tensor] = []  # per chunk: [peak logit, sum exp(logit - peak)]
        inv_norms: list[torch.Tensor] = []  # 1/|w| of the rows in use, for the backward
        kept: _KeptBlock | None = None
        fused = None
        if opts.backend == "triton" and num_used > 0:
            # The fused kernels replace the chunk loop (no logits block at all).
            from partial_fc.triton_ce import fused_forward

            fused = fused_forward(
                xn, weight, sampled, target_col, margin.scale, opts.matmul_dtype,
                opts.triton_tiles, with_dx=ctx.needs_input_grad[0] and opts.training,
            )  # fmt: skip
            peak, chunk_sum = fused.peak.to(xn.dtype), fused.total.to(xn.dtype)
            max_other = peak
            new_max = torch.maximum(local_max, peak)
            local_sum = _rescaled(local_sum, local_max, new_max) + _rescaled(
                chunk_sum, peak, new_max
            )
            local_max = new_max
            bounds = []

        for start, stop in bounds:
            w_rows = _chunk_weight(weight, sampled, start, stop, k)
            inv_norms.append(_inverse_norms(w_rows))
            in_chunk, col = _in_chunk(owned, target_col, start, stop)
            logits, choice = _nontarget_logits(
                xn, w_rows, inv_norms[-1] * margin.scale, col, in_chunk, opts
            )
            # amax, not max(dim): no indices, several times faster on the CPU.
            peak = logits.amax(dim=1)
            max_other = torch.maximum(max_other, peak)
            conflict = _filter_(logits, opts)
            slope = _reweight_hard_(logits, terms, margin.scale)
            if conflict is not None or slope is not None:
                peak = logits.amax(dim=1)
            probs = _softmax_(logits, opts)
            # sum_j exp(l_j - l_peak) = 1 / max_j p_j (0 for a row of -inf only).
            top = probs.amax(dim=1)
            chunk_sum = torch.where(top > 0, top.reciprocal(), 0.0)
            chunk_stats.append(torch.stack([peak, chunk_sum]))
            new_max = torch.maximum(local_max, peak)
            local_sum = _rescaled(local_sum, local_max, new_max) + _rescaled(
                chunk_sum, peak, new_max
            )
            local_max = new_max
            if stop == num_used:
                # Keep the last chunk's softmax for the backward, which starts with it
                # and frees it before recomputing any other chunk. In "zero" mode the
                # conflicts' gradient is masked, so keep the mask too.
                zero_mode = conflict is not None and opts.filter_mode == "zero"
                kept = _KeptBlock(
                    start, probs, choice, conflict if zero_mode else None, w_rows, slope
                )
            del logits, probs, conflict, choice, w_rows, slope

        stats_max = all_reduce_(torch.stack([local_max, max_other]), dist.ReduceOp.MAX, opts.group)
        global_max = stats_max[0]
        stats_sum = all_reduce_(
            torch.stack(
                [
                    _rescaled(local_sum, local_max, global_max),
                    torch.where(owned, target_logit, 0.0),
                    torch.where(owned, target_cos, 0.0),
                ]
            ),
            dist.ReduceOp.SUM,
            opts.group,
        )
        log_sum_exp = global_max + torch.log(stats_sum[0])
        global_target_logit = stats_sum[1]
        per_sample = torch.where(valid, log_sum_exp - global_target_logit, 0.0)
        num_valid = valid.sum().clamp(min=1).to(per_sample.dtype)
        loss = per_sample.sum() / num_valid
        if terms.extra_loss is not None:
            loss = loss + terms.extra_loss
        correct = valid & (stats_sum[2] * margin.scale >= stats_max[1])

        ctx.mark_non_differentiable(correct)
        ctx.has_sampled = sampled is not None
        # Skipped rows (padding, ignore_index) get lse = +inf: their softmax is then
        # exactly 0 in the backward, never inf * 0 (their log-sum-exp may be -inf).
        log_sum_exp = torch.where(valid, log_sum_exp, float("inf"))
        empty = xn.new_empty(0)
        ctx.save_for_backward(
            xn, x_norms, weight, target_col, target_logit, target_slope, target_cos,
            target_row, target_pos, target_inv, log_sum_exp, valid, num_valid,
            torch.stack(chunk_stats) if chunk_stats else empty,
            torch.cat(inv_norms) if inv_norms else empty,
            *((sampled,) if sampled is not None else ()),
        )  # fmt: skip
        # An intermediate, not an input or output: held on ctx so the backward can
        # drop it as soon as it is used (saved tensors live until the backward ends).
        ctx.kept = kept
        ctx.fused = fused  # the triton backend's statistics and (B, D) direction, or None
        ctx.opts, ctx.bounds = opts, bounds
        ctx.terms = terms
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_correct: torch.Tensor | None):
        (xn, x_norms, weight, target_col, target_logit, target_slope, target_cos, target_row,
         target_pos, target_inv, log_sum_exp, valid, num_valid, chunk_stats, all_inv_norms,
         *rest) = ctx.saved_tensors  # fmt: skip
        sampled = rest[0] if ctx.has_sampled else None
        # A second backward (retain_graph) finds the kept block gone and recomputes.
        kept, ctx.kept = ctx.kept, None
        opts, bounds = ctx.opts, ctx.bounds
        k, scale = opts.num_subcenters, opts.margin.scale
        need_embeddings, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]

        # d loss / d logit_ij = row_scale_i * (p_ij - [j == target_i])
        row_scale = (grad_loss / num_valid) * valid.to(xn.dtype)
        owned = target_col >= 0
        grad_xn = torch.zeros_like(xn)
        # Gradient rows of the classes in use, in their order: the whole shard's
        # gradient without sampling, the sampled rows' values with it. Chunk [start,
        # stop) owns rows [start*K, stop*K) and writes every one of them.
        grad_rows = None
        if need_weight:
            num_rows = weight.shape[0] if sampled is None else sampled.shape[0] * k
            grad_rows = weight.new_empty((num_rows, weight.shape[1]))

        # Last chunk first: its block was kept by the forward and is freed after use.
        for index in reversed(range(len(bounds))):
            start, stop = bounds[index]
            inv_norms = all_inv_norms[start * k : stop * k]
            if kept is not None and kept.start == start:
                _, probs, choice, conflict, w_rows, slope = kept
                kept = None
            else:
                w_rows = _chunk_weight(weight, sampled, start, stop, k)
                in_chunk, col = _in_chunk(owned, target_col, start, stop)
                probs, choice = _nontarget_logits(
                    xn, w_rows, inv_norms * scale, col, in_chunk, opts
                )
                conflict = _filter_(probs, opts)
                slope = _reweight_hard_(probs, ctx.terms, scale)
                probs = _softmax_(probs, opts)
            if conflict is not None and opts.filter_mode == "zero":
                probs.masked_fill_(conflict, 0.0)  # a constant 0 has no gradient
            if slope is not None:
                probs.mul_(slope)  # CurricularFace's hard negatives: d logit / d (s cos)
            # p_ij = probs_ij * chunk_sum_i * exp(peak_i - lse_i), so
            # d loss / d cos_ij = row_factor_i * probs_ij.
            peak, chunk_sum = chunk_stats[index]
            row_factor = (row_scale * scale) * chunk_sum * torch.exp(peak - log_sum_exp)
            if k > 1:
                # Only the winning sub-centre of each class receives the gradient.
                spread = probs.new_zeros((probs.shape[0], probs.shape[1], k))
                spread.scatter_(2, choice.unsqueeze(2), probs.unsqueeze(2))
                probs = spread.view(probs.shape[0], -1)
            # d cos_ij / d x_hat_i = w_j / |w_j|: the column factor is the block's one pass.
            block = probs.mul_(inv_norms)
            if need_embeddings:
                grad_xn.addcmul_(_matmul(block, w_rows, opts.matmul_dtype), row_factor[:, None])
            if need_weight:
                scaled_xn = xn * row_factor[:, None]
                target = grad_rows[start * k : stop * k]
                if opts.matmul_dtype is None:
                    torch.mm(block.t(), scaled_xn, out=target)
                else:
                    target.copy_(_matmul(block.t(), scaled_xn, opts.matmul_dtype))
                _weight_grad_(target, w_rows, inv_norms)
            del block, probs, w_rows, slope
        if ctx.fused is not None:
            from partial_fc.triton_ce import fused_backward

            fused_backward(
                ctx.fused, xn, weight, sampled, target_col, log_sum_exp, row_scale * scale,
                scale, opts.matmul_dtype, grad_xn if need_embeddings else None, grad_rows,
            )  # fmt: skip

        target_prob = torch.exp(target_logit - log_sum_exp)
        if bounds or ctx.fused is not None:
            # The target entries: d loss / d cos_target = r_i * (p_target - 1) * slope_i,
            # through cos = <x_hat, w> / |w|, one (B, D) update for all chunks.
            grad_cos = torch.where(owned, row_scale * (target_prob - 1.0) * target_slope, 0.0)
            centres = weight[target_row]
            coef = grad_cos * target_inv
            if need_embeddings:
                grad_xn.addcmul_(centres, coef[:, None])
            if need_weight:
                # d cos / d w = (x_hat - w_hat * cos) / |w|
                unit_centres = centres.mul_((target_inv * target_cos)[:, None])
                grad_rows.index_add_(0, target_pos, (xn - unit_centres).mul_(coef[:, None]))

        grad_embeddings = None
        if need_embeddings:
            grad_embeddings = _normalise_backward(grad_xn, xn, x_norms)
            grad_norm = _norm_gradient(ctx.terms, owned, row_scale, target_prob, grad_loss, opts)
            if grad_norm is not None:
                # d |z| / d z = z / |z|: the radial part of the embedding gradient.
                grad_embeddings.addcmul_(xn, grad_norm[:, None])
        grad_weight = grad_rows
        if need_weight and sampled is not None:
            # Sorted, unique rows: coalesced by construction (no sort, no host sync).
            rows = _class_rows(sampled, k).unsqueeze(0)
            grad_weight = torch.sparse_coo_tensor(
                rows, grad_rows, weight.shape, is_coalesced=True, check_invariants=False
            )
        if grad_weight is not None and ctx.weight_dtype != grad_weight.dtype:
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_embeddings, grad_weight, None, None, None, None, None
