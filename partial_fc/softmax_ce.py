"""Exact margin-softmax cross-entropy over classes sharded across ranks.

Shapes: B global batch, D embedding size, K sub-centres per class, and this
rank's classes in use: S (all ``num_local`` classes, or the sampled ones).

Forward. The classes in use are visited in chunks of at most ``chunk_classes``.
For each chunk the cosines ``(B, chunk)`` are formed (max over sub-centres),
the target entries replaced by the margin's target logit, and an online
log-sum-exp keeps one running ``(max, sum)`` pair per sample. Two all-reduces
then make the statistics global: MAX of ``[local max logit, max cosine]`` and
SUM of ``[rescaled exp-sum, target logit, target cosine]``. The loss is the mean
over valid samples of ``logsumexp - target_logit``, computed in the log domain:
no probability is clamped, so no per-sample loss is capped.

Backward needs no collective: ``d loss / d logit = (softmax - onehot) / n``
uses only the local logits and the global log-sum-exp. The forward keeps the
last chunk's exponentiated block; the backward starts with it, frees it, and
recomputes the other chunks one at a time. So at most one ``(B, chunk)`` logits
block is alive at any time, and the matrix products per step number three (one
chunk) up to ``4 - 1/n`` (n chunks) instead of four.

Inter-class filtering (Partial FC, CVPR 2022): a negative class whose cosine to
a sample exceeds ``filter_threshold`` is taken for a label conflict (the same
identity under two labels). ``filter_mode="remove"`` drops it from that
sample's softmax altogether (logit -inf, no gradient). ``"zero"`` is the
reference implementation's behaviour: the cosine is set to 0, so the entry
still adds ``exp(0)`` to the denominator, with no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from partial_fc.collectives import all_reduce_
from partial_fc.margins import CombinedMargin

_NORM_EPS = 1e-12


def _chunk_weight(
    weight: torch.Tensor, sampled: torch.Tensor | None, start: int, stop: int, k: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of classes ``[start, stop)`` of the classes in use: ``((stop-start)*K, D)``
    and, under sampling, their row indices into ``weight``."""
    if sampled is None:
        return weight[start * k : stop * k], None
    rows = (sampled[start:stop, None] * k + torch.arange(k, device=weight.device)).reshape(-1)
    return weight.index_select(0, rows), rows


def _inverse_norms(rows: torch.Tensor) -> torch.Tensor:
    """``1 / |row|`` per row ``(n,)``, without materialising normalised rows."""
    return torch.linalg.vector_norm(rows, dim=1).clamp_min(_NORM_EPS).reciprocal()


def _matmul(a: torch.Tensor, b: torch.Tensor, low_precision: torch.dtype | None) -> torch.Tensor:
    """``a @ b`` in the inputs' dtype, or with both operands rounded to
    ``low_precision`` (bf16/fp16 tensor cores) and the product returned in the
    inputs' dtype. On CUDA the accumulation stays fp32 (``out_dtype``); elsewhere
    the low-precision product is rounded once more before the cast back."""
    if low_precision is None:
        return a @ b
    a_low, b_low = a.to(low_precision), b.to(low_precision)
    if a.is_cuda:
        return torch.mm(a_low, b_low, out_dtype=a.dtype)
    return (a_low @ b_low).to(a.dtype)


def _class_cosines(
    xn: torch.Tensor,
    w_rows: torch.Tensor,
    inv_norms: torch.Tensor,
    k: int,
    low_precision: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cosines ``(B, w)`` of each class (max over its K sub-centres) and the
    winning sub-centre ``(B, w)`` (None for K = 1). The weight rows are not
    normalised; the ``(B, w*K)`` product is scaled by their inverse norms instead,
    which touches B*w*K numbers rather than copying w*K*D."""
    cos = _matmul(xn, w_rows.t(), low_precision).mul_(inv_norms)
    if k == 1:
        return cos, None
    best = cos.view(cos.shape[0], -1, k).max(dim=2)
    return best.values, best.indices


def _normalise(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norms = rows.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
    return rows / norms, norms


def _normalise_backward(grad_unit: torch.Tensor, unit: torch.Tensor, norms: torch.Tensor):
    """Gradient through ``unit = rows / |rows|``: ``(g - unit * <unit, g>) / |rows|``."""
    return (grad_unit - unit * (unit * grad_unit).sum(dim=1, keepdim=True)) / norms


_ROW_DOT_BLOCK = 2048


def _weight_grad_(scaled_grad: torch.Tensor, w_rows: torch.Tensor, inv_norms: torch.Tensor):
    """Turn ``A = (G / |w|)^T x_hat`` into the gradient through ``w / |w|`` in place:
    ``A - w * <w, A> / |w|^2``."""
    row_dot = torch.empty_like(inv_norms)
    # Row-wise dot products in blocks: a small temporary, and faster than one
    # batched (1 x D) @ (D x 1) product.
    for start in range(0, w_rows.shape[0], _ROW_DOT_BLOCK):
        stop = start + _ROW_DOT_BLOCK
        torch.sum(w_rows[start:stop] * scaled_grad[start:stop], dim=1, out=row_dot[start:stop])
    coef = row_dot.mul_(inv_norms).mul_(inv_norms)
    return scaled_grad.addcmul_(w_rows, coef.unsqueeze(1), value=-1.0)


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


def _chunk_logits_(
    cos: torch.Tensor,
    col: torch.Tensor,
    in_chunk: torch.Tensor,
    target_logit: torch.Tensor,
    opts: CEOptions,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Turn a cosine block ``(B, w)`` into logits in place: inter-class filtering,
    ``scale * cos``, and the target entries (``in_chunk`` rows, column ``col``)
    set to ``target_logit``. Returns the logits and the conflict mask (or None)."""
    conflict = None
    if opts.filter_threshold is not None:
        conflict = cos > opts.filter_threshold
        # A sample's own class is never a conflict.
        conflict.scatter_(1, col, conflict.gather(1, col) & ~in_chunk[:, None])
    logits = cos.mul_(opts.margin.scale)
    if conflict is not None:
        logits.masked_fill_(conflict, float("-inf") if opts.filter_mode == "remove" else 0.0)
    kept = logits.gather(1, col).squeeze(1)
    logits.scatter_(1, col, torch.where(in_chunk, target_logit, kept)[:, None])
    return logits, conflict


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
        k, chunk_classes, margin = opts.num_subcenters, opts.chunk_classes, opts.margin
        xn, x_norms = _normalise(embeddings)
        batch = xn.shape[0]
        num_used = sampled.shape[0] if sampled is not None else weight.shape[0] // k
        owned = target_col >= 0
        neg_inf = float("-inf")
        local_max = xn.new_full((batch,), neg_inf)
        local_sum = xn.new_zeros(batch)
        max_cos = xn.new_full((batch,), neg_inf)
        target_cos = xn.new_zeros(batch)
        target_logit = xn.new_zeros(batch)
        target_slope = xn.new_zeros(batch)
        kept: tuple = ()
        inv_norms: list[torch.Tensor] = []  # 1/|w| of the rows in use, for the backward

        for start in range(0, num_used, chunk_classes):
            stop = min(num_used, start + chunk_classes)
            w_rows, _ = _chunk_weight(weight, sampled, start, stop, k)
            inv_norms.append(_inverse_norms(w_rows))
            cos, choice = _class_cosines(xn, w_rows, inv_norms[-1], k, opts.matmul_dtype)
            del w_rows
            max_cos = torch.maximum(max_cos, cos.max(dim=1).values)

            in_chunk = owned & (target_col >= start) & (target_col < stop)
            col = (target_col - start).clamp(0, stop - start - 1).unsqueeze(1)
            chunk_target_cos = cos.gather(1, col).squeeze(1)
            logit, slope = margin.target_logit(chunk_target_cos, labels, opts.step)
            target_cos = torch.where(in_chunk, chunk_target_cos, target_cos)
            target_logit = torch.where(in_chunk, logit, target_logit)
            target_slope = torch.where(in_chunk, slope, target_slope)

            logits, conflict = _chunk_logits_(cos, col, in_chunk, logit, opts)
            new_max = torch.maximum(local_max, logits.max(dim=1).values)
            # Rows whose entries are all filtered out stay at max -inf, sum 0.
            shift = torch.where(new_max == neg_inf, torch.zeros_like(new_max), new_max)
            exps = logits.sub_(shift[:, None]).exp_()
            local_sum = local_sum * torch.exp(local_max - shift) + exps.sum(dim=1)
            local_max = new_max
            if stop == num_used:
                # Keep the last chunk's exp(logit - local_max) for the backward, which
                # starts with it and frees it before recomputing any other chunk. In
                # "zero" mode the conflicts' gradient is masked, so keep the mask too.
                zero_mode = conflict is not None and opts.filter_mode == "zero"
                kept = (start, exps, choice, conflict if zero_mode else None)
            del cos, logits, exps, conflict

        stats_max = all_reduce_(torch.stack([local_max, max_cos]), dist.ReduceOp.MAX, opts.group)
        global_max, max_cos = stats_max[0], stats_max[1]
        # A rank with no classes (or all filtered) has local_max = -inf, local_sum = 0.
        rescaled = torch.where(
            local_sum > 0, local_sum * torch.exp(local_max - global_max), local_sum
        )
        stats_sum = all_reduce_(
            torch.stack([rescaled, target_logit, target_cos]), dist.ReduceOp.SUM, opts.group
        )
        log_sum_exp = global_max + torch.log(stats_sum[0])
        per_sample = torch.where(valid, log_sum_exp - stats_sum[1], torch.zeros_like(log_sum_exp))
        num_valid = valid.sum().clamp(min=1).to(per_sample.dtype)
        loss = per_sample.sum() / num_valid
        correct = valid & (stats_sum[2] >= max_cos)

        ctx.mark_non_differentiable(correct)
        ctx.has_sampled = sampled is not None
        # Skipped rows (padding, ignore_index) get lse = +inf: their softmax is then
        # exactly 0 in the backward, never inf * 0 (their log-sum-exp may be -inf).
        log_sum_exp = torch.where(valid, log_sum_exp, torch.full_like(log_sum_exp, float("inf")))
        ctx.save_for_backward(
            xn, x_norms, weight, target_col, target_logit, target_slope, log_sum_exp,
            local_max, valid, num_valid, torch.cat(inv_norms) if inv_norms else xn.new_empty(0),
            *((sampled,) if sampled is not None else ()),
        )  # fmt: skip
        # An intermediate, not an input or output: held on ctx so the backward can
        # drop it as soon as it is used (saved tensors live until the backward ends).
        ctx.kept = kept or None
        ctx.opts, ctx.num_used = opts, num_used
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_correct: torch.Tensor | None):
        (xn, x_norms, weight, target_col, target_logit, target_slope, log_sum_exp,
         local_max, valid, num_valid, all_inv_norms, *rest) = ctx.saved_tensors  # fmt: skip
        sampled = rest[0] if ctx.has_sampled else None
        # A second backward (retain_graph) finds the kept block gone and recomputes.
        kept, ctx.kept = ctx.kept, None
        opts, num_used = ctx.opts, ctx.num_used
        k, scale, chunk_classes = opts.num_subcenters, opts.margin.scale, opts.chunk_classes
        need_embeddings, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]

        # d loss / d logit_ij = row_scale_i * (p_ij - [j == target_i])
        row_scale = (grad_loss / num_valid) * valid.to(xn.dtype)
        owned = target_col >= 0
        grad_xn = torch.zeros_like(xn)
        grad_weight = None
        if need_weight:
            # Every row is written below unless sampling leaves some out.
            grad_weight = (
                torch.zeros_like(weight) if sampled is not None else torch.empty_like(weight)
            )

        # Last chunk first: its block was kept by the forward and is freed after use.
        for start in reversed(range(0, num_used, chunk_classes)):
            stop = min(num_used, start + chunk_classes)
            w_rows, row_index = _chunk_weight(weight, sampled, start, stop, k)
            inv_norms = all_inv_norms[start * k : stop * k]
            in_chunk = owned & (target_col >= start) & (target_col < stop)
            col = (target_col - start).clamp(0, stop - start - 1).unsqueeze(1)
            if kept is not None and kept[0] == start:
                # p = exp(logit - shift) * exp(shift - lse), the forward's block in place.
                _, probs, choice, conflict = kept
                kept = None
                shift = torch.where(
                    local_max == float("-inf"), torch.zeros_like(local_max), local_max
                )
                probs.mul_(torch.exp(shift - log_sum_exp)[:, None])
            else:
                cos, choice = _class_cosines(xn, w_rows, inv_norms, k, opts.matmul_dtype)
                logits, conflict = _chunk_logits_(cos, col, in_chunk, target_logit, opts)
                probs = logits.sub_(log_sum_exp[:, None]).exp_()
            target_prob = probs.gather(1, col).squeeze(1)
            # Off-target entries: d loss / d cos = scale * row_scale * p.
            grad_cos = probs.mul_((row_scale * scale)[:, None])
            # The target entry goes through the margin: slope = d logit / d cos.
            grad_target = row_scale * (target_prob - 1.0) * target_slope
            grad_cos.scatter_(
                1,
                col,
                torch.where(in_chunk, grad_target, grad_cos.gather(1, col).squeeze(1))[:, None],
            )
            if conflict is not None and opts.filter_mode == "zero":
                grad_cos.masked_fill_(conflict, 0.0)  # a constant 0 has no gradient
            if k > 1:
                # Only the winning sub-centre of each class receives the gradient.
                spread = grad_cos.new_zeros((grad_cos.shape[0], grad_cos.shape[1], k))
                spread.scatter_(2, choice.unsqueeze(2), grad_cos.unsqueeze(2))
                grad_cos = spread.view(grad_cos.shape[0], -1)
            # d cos_ij / d x_hat_i = w_j / |w_j|: fold 1/|w_j| into the gradient block.
            grad_cos.mul_(inv_norms)
            if need_embeddings:
                grad_xn.add_(_matmul(grad_cos, w_rows, opts.matmul_dtype))
            if need_weight:
                if row_index is None and opts.matmul_dtype is None:
                    target = grad_weight[start * k : stop * k]
                    torch.mm(grad_cos.t(), xn, out=target)
                    _weight_grad_(target, w_rows, inv_norms)
                elif row_index is None:
                    grad_weight[start * k : stop * k] = _weight_grad_(
                        _matmul(grad_cos.t(), xn, opts.matmul_dtype), w_rows, inv_norms
                    )
                else:
                    grad_weight.index_copy_(
                        0,
                        row_index,
                        _weight_grad_(
                            _matmul(grad_cos.t(), xn, opts.matmul_dtype), w_rows, inv_norms
                        ),
                    )
            del grad_cos, probs, w_rows

        grad_embeddings = _normalise_backward(grad_xn, xn, x_norms) if need_embeddings else None
        return grad_embeddings, grad_weight, None, None, None, None, None
