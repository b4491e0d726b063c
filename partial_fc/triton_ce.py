"""Fused Triton kernels for the non-target part of the margin-softmax cross-entropy.

The torch path (:mod:`partial_fc.softmax_ce`) writes a ``(B, chunk)`` block of logits
and makes several passes over it. Here no logits block exists in memory at all: each
kernel computes its tiles of ``cos = x_hat . w / |w|`` in registers, uses them and
drops them. Everything else of a step (the target cosines and the margin, the
all-reduces, the loss, the target entries' gradient, sparse gradients, MagFace's norm
gradient) stays in :class:`partial_fc.softmax_ce.MarginSoftmaxCE`, which calls
:func:`fused_forward` and :func:`fused_backward` in place of its chunk loops when
``CEOptions.backend == "triton"``.

Shapes: B global batch, D embedding size, S classes in use (all ``C_local``, or the
sampled ones, whose rows the kernels read through the index vector: no gathered copy).

Kernels (all accumulate in fp32; operands in ``matmul_dtype`` or the inputs' dtype):

``_inverse_norms_kernel``
    ``1 / |w_j|`` of the S rows in use, one pass over them: ``(S,)`` fp32.
``_forward_kernel``, grid ``(B / block_b, splits)``
    Program ``(i, s)`` holds ``block_b`` embeddings and walks split s of the classes in
    tiles of ``block_c``: ``l = scale * (x_hat . w) / |w|`` with the target column set to
    -inf, and FlashAttention's online softmax per row: a running max ``m`` and a running
    sum ``sum exp(l - m)``, both rescaled whenever ``m`` grows. With ``with_dx`` it also
    accumulates ``U_i = sum_j exp(l_ij - m_i) w_j / |w_j|``, the same rescaling applied:
    FlashAttention's ``P V`` with ``V = W / |w|``. Each program writes its row tile's
    ``(m, sum, U)`` for its split; the splits are merged in torch (a ``(B, splits)`` and a
    batched ``(B, 1, splits) @ (B, splits, D)`` product).
``_weight_grad_kernel``, grid ``(S / grad_block_c,)``
    Program j holds ``grad_block_c`` class rows and walks the whole batch in tiles of
    ``grad_block_b`` rows: it recomputes ``l`` and turns it into ``g_ij = r_i p_ij``
    (``p_ij = exp(l_ij - lse_i)`` with the global log-sum-exp, ``r_i = scale * d loss /
    d logit_i`` per row), accumulates ``A_j = sum_i g_ij x_hat_i`` in registers, and
    finishes with the column factor and the projection through ``w / |w|`` in the same
    program: ``grad w_j = A_j / |w_j| - w_j <w_j, A_j> / |w_j|^3``. Every row of the
    gradient is written once, by one program: no atomics.

Why the embedding gradient comes from the forward. The non-target part of ``d loss /
d x_hat_i`` is ``sum_j r_i p_ij w_j / |w_j| = r_i exp(m_i - lse_i) U_i``: the row factors
``r_i`` and ``exp(-lse_i)``, unknown in the forward (``lse`` needs the all-reduce, ``r``
the loss gradient), come out of the sum over classes. The weight gradient's sum runs
over rows, so its row factors cannot come out: it needs the global ``lse``, hence a
recomputation in the backward. A step therefore costs four ``B x S x D`` products
(forward ``X W^T`` and ``P V``, backward ``X W^T`` and ``G^T X``) against the three bare
products of a head that keeps its logits, the least any head that recomputes can do
(4/3 of the bare time). The alternatives cost more on this problem's shape, where S is
hundreds of times B:

* FlashAttention-2's backward (one kernel over class tiles for ``dW``, one over row
  tiles recomputing the logits once more for ``dX``): five products. Kept as
  ``TritonTiles(dx_in_forward=False)`` (the forward then skips ``U``; the backward
  runs the forward kernel again to accumulate it), so that a GPU can measure both
  (``bench/gpu_check/``).
* One backward kernel recomputing each tile once and scattering one of the two
  gradients with atomics: four products, but ``(S / block_c) * B * D`` atomic adds for
  ``dX`` (a billion or more at C_local 256k, B 1024, D 512) or ``(B / block_b) * S * D`` for
  ``dW``: several GiB of read-modify-write traffic, more than a product costs.

Memory beyond the weight and its gradient: ``U``'s per-split partials ``(B, splits, D)``
fp32 (splits capped so they stay within 32 MiB), ``U`` itself ``(B, D)`` saved for the
backward, and ``(S,)`` inverse norms: O(B * D) at fixed splits.

Interpreter. ``TRITON_INTERPRET=1`` runs the kernels on the CPU through numpy (the
tests do). It must be set before triton is first imported (``triton.jit`` reads it when
it decorates, triton's own library included); :mod:`partial_fc.softmax_ce` imports this
module only when a head runs the triton backend. Triton 3.9's interpreter multiplies
bf16 operands as their raw 16-bit integers, so under it the kernels round the operands
to bf16 and multiply them in fp32: the same numbers as bf16 tensor cores accumulating in
fp32 (rounding to nearest even on the bits, as the interpreter's own bf16 cast
truncates).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

_NORM_EPS = 1e-12  # as partial_fc.softmax_ce: 1 / max(|w|, eps)
_SPLIT_BYTES = 32 << 20  # the forward's (B, splits, D) fp32 partials stay within this
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
SUPPORTED_DTYPES = tuple(_TL_DTYPES)
"""Weight / embedding dtypes the kernels read (fp64 stays on the torch path)."""


@dataclass(frozen=True)
class TritonTiles:
    """Tile sizes and launch settings of the kernels; the defaults are
    :func:`default_tiles` at D 512 with bf16 operands. Block sizes are powers of two, at
    least 16 (``tl.dot``'s smallest tile)."""

    block_b: int = 32
    """Forward: embeddings (rows) per program."""
    block_c: int = 32
    """Forward: classes per step of a program's walk over its split."""
    grad_block_c: int = 16
    """Weight-gradient kernel: classes (gradient rows) per program."""
    grad_block_b: int = 32
    """Weight-gradient kernel: rows per step of a program's walk over the batch."""
    num_warps: int = 8
    """Warps per program of the forward kernel."""
    grad_num_warps: int = 8
    """Warps per program of the weight-gradient kernel."""
    num_stages: int = 2
    """Software-pipelining stages of the forward kernel's loop (GPU only)."""
    grad_num_stages: int = 1
    """Software-pipelining stages of the weight-gradient kernel's loop (GPU only)."""
    splits: int | None = None
    """Class splits of the forward (its second grid axis). None: enough programs to fill
    the GPU twice over (one on the interpreter), capped by the number of class tiles
    and by the 32 MiB of per-split partials."""
    dx_in_forward: bool = True
    """Accumulate the embedding gradient's direction ``U`` in the forward (four products
    per step). False: FlashAttention-2's layout, the backward recomputing the logits for
    it (five products); kept so that a GPU can measure both."""

    def __post_init__(self) -> None:
        for name in ("block_b", "block_c", "grad_block_c", "grad_block_b"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"TritonTiles.{name} must be a power of two >= 16, got {value}")
        for name in ("num_warps", "grad_num_warps", "num_stages", "grad_num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"TritonTiles.{name} must be >= 1, got {getattr(self, name)}")
        if self.splits is not None and self.splits < 1:
            raise ValueError(f"TritonTiles.splits must be >= 1 or None, got {self.splits}")


def default_tiles(dim: int, compute_dtype: torch.dtype) -> TritonTiles:
    """Tiles for ``dim``-wide embeddings multiplied in ``compute_dtype``. No GPU has timed
    them (``bench/gpu_check/`` autotunes and records the best); they are the ones
    that compile for sm_90 (H100/H200) without spilling registers, by ptxas's resource
    report (Triton 3.9, D 512, bf16 operands, compiled here without a GPU):

    * forward 32 rows x 32 classes, 8 warps, 2 stages: 196 registers, no spill, 98 KiB
      of shared memory (32 x 64 spills 96 B, 64 x 64 spills 1.3 KB and needs 256 KiB,
      more than an SM has);
    * weight gradient 16 classes x 32 rows, 8 warps, 1 stage: 179 registers, no spill,
      80 KiB (32 x 64 spills 1.3 KB).

    The ``rows x D`` fp32 accumulators (``U``, ``A``) are what limits the tiles: at D
    512 and 8 warps 32 rows take 64 registers a thread. Narrower embeddings get more
    rows where that still compiles without spills: the forward 64 rows at D 128 (211
    registers; at D 256 it spills), the gradient 32 classes up to D 256 (238 registers).
    These defaults compile without spills at D 128, 256 and 512, sampled or not, fp32 or
    bf16 weights. fp32 operands spill whatever the tiles (9-28 KB a thread at D 512):
    ``"auto"`` leaves fp32 products on torch (:func:`partial_fc.backend.auto_picks_triton`).
    """
    return TritonTiles(
        block_b=64 if dim <= 128 else 32,
        block_c=32,
        grad_block_c=32 if dim <= 256 else 16,
        grad_block_b=32,
        num_warps=8,
        grad_num_warps=8,
        num_stages=2,
        grad_num_stages=1,
    )


# ------------------------------------------------------------------------------ kernels
@triton.jit
def _rounded(a, CDT: tl.constexpr):
    """``a`` rounded to ``CDT`` (to nearest, ties to even) and returned in fp32. The
    interpreter's own fp32 -> bf16 cast truncates, so bf16 is rounded on the bits."""
    if CDT == tl.bfloat16:
        bits = a.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        out = bits.to(tl.float32, bitcast=True)
    else:
        out = a.to(CDT).to(tl.float32)
    return out


@triton.jit
def _operand(a, CDT: tl.constexpr, ROUND: tl.constexpr):
    """``a`` as a product operand: in ``CDT``, or (``ROUND``: the interpreter with 16-bit
    operands) rounded to ``CDT`` and kept in fp32. Idempotent."""
    if ROUND:
        out = _rounded(a, CDT)
    else:
        out = a.to(CDT)
    return out


@triton.jit
def _mm(a, b, CDT: tl.constexpr, ROUND: tl.constexpr, PRECISION: tl.constexpr):
    """``a @ b`` with operands as :func:`_operand` makes them and an fp32 result (a no-op
    conversion for operands made once before a loop)."""
    if ROUND:
        out = tl.dot(_rounded(a, CDT), _rounded(b, CDT), input_precision="ieee")
    else:
        out = tl.dot(a.to(CDT), b.to(CDT), input_precision=PRECISION, out_dtype=tl.float32)
    return out


@triton.jit
def _inverse_norms_kernel(
    w_ptr, idx_ptr, out_ptr, num_used, dim, stride_w, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_IDX: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_used
    if HAS_IDX:
        w_rows = tl.load(idx_ptr + rows, mask=row_ok, other=0)
    else:
        w_rows = rows
    base = w_rows.to(tl.int64)[:, None] * stride_w
    total = tl.zeros((BLOCK_R,), tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (dims < dim)[None, :]
        w = tl.load(w_ptr + base + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        total += tl.sum(w * w, axis=1)
    inv = 1.0 / tl.maximum(tl.sqrt(total), eps)
    tl.store(out_ptr + rows, inv, mask=row_ok)


@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, idx_ptr, inv_ptr, tcol_ptr, max_ptr, sum_ptr, u_ptr,
    num_rows, num_used, dim, stride_x, stride_w, classes_per_split, scale,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_IDX: tl.constexpr, WITH_U: tl.constexpr, CDT: tl.constexpr, ROUND: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < num_rows
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    x_mask = row_ok[:, None] & dim_ok[None, :]
    x = tl.load(
        x_ptr + rows.to(tl.int64)[:, None] * stride_x + dims[None, :], mask=x_mask, other=0.0
    )
    x = _operand(x, CDT, ROUND)  # once, not in every step of the walk
    tcol = tl.load(tcol_ptr + rows, mask=row_ok, other=-1)
    c_begin = split * classes_per_split
    c_end = tl.minimum(c_begin + classes_per_split, num_used)
    run_max = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_B,), tl.float32)
    acc = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
    for c0 in range(c_begin, c_end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < c_end
        if HAS_IDX:
            w_rows = tl.load(idx_ptr + cols, mask=col_ok, other=0)
        else:
            w_rows = cols
        w_mask = col_ok[:, None] & dim_ok[None, :]
        w = tl.load(w_ptr + w_rows.to(tl.int64)[:, None] * stride_w + dims[None, :], mask=w_mask,
                    other=0.0)  # fmt: skip
        w = _operand(w, CDT, ROUND)  # once for both products
        inv = tl.load(inv_ptr + cols, mask=col_ok, other=0.0)
        logits = _mm(x, tl.trans(w), CDT, ROUND, PRECISION) * (scale * inv)[None, :]
        # The target entry is accounted for apart (its margin logit), as are the
        # columns past the split's end.
        skip = (cols[None, :] == tcol[:, None]) | (col_ok == 0)[None, :]
        logits = tl.where(skip, float("-inf"), logits)
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        # A row with no finite logit yet keeps 0 as its reference: exp(-inf) = 0, no NaN.
        ref = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = tl.exp(run_max - ref)
        p = tl.exp(logits - ref[:, None])
        run_sum = run_sum * alpha + tl.sum(p, axis=1)
        if WITH_U:
            acc = acc * alpha[:, None] + _mm(p * inv[None, :], w, CDT, ROUND, PRECISION)
        run_max = new_max
    out = rows * num_splits + split
    tl.store(max_ptr + out, run_max, mask=row_ok)
    tl.store(sum_ptr + out, run_sum, mask=row_ok)
    if WITH_U:
        tl.store(u_ptr + out.to(tl.int64)[:, None] * dim + dims[None, :], acc, mask=x_mask)


@triton.jit
def _weight_grad_kernel(
    x_ptr, w_ptr, idx_ptr, inv_ptr, tcol_ptr, lse_ptr, factor_ptr, grad_ptr,
    num_rows, num_used, dim, stride_x, stride_w, stride_g, scale,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_IDX: tl.constexpr, CDT: tl.constexpr, ROUND: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < num_used
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    if HAS_IDX:
        w_rows = tl.load(idx_ptr + cols, mask=col_ok, other=0)
    else:
        w_rows = cols
    w_offsets = w_rows.to(tl.int64)[:, None] * stride_w + dims[None, :]
    w_mask = col_ok[:, None] & dim_ok[None, :]
    # Held through the walk as an operand; the fp32 rows are reread for the projection.
    w = _operand(tl.load(w_ptr + w_offsets, mask=w_mask, other=0.0), CDT, ROUND)
    inv = tl.load(inv_ptr + cols, mask=col_ok, other=0.0)
    col_scale = scale * inv
    acc = tl.zeros((BLOCK_C, BLOCK_D), tl.float32)
    for r0 in range(0, num_rows, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B)
        row_ok = rows < num_rows
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # fmt: skip
        x = _operand(x, CDT, ROUND)  # once for both products
        # Rows past the batch: lse = +inf and factor 0 give g = 0 (skipped rows come
        # with lse = +inf already).
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
        factor = tl.load(factor_ptr + rows, mask=row_ok, other=0.0)
        tcol = tl.load(tcol_ptr + rows, mask=row_ok, other=-1)
        logits = _mm(x, tl.trans(w), CDT, ROUND, PRECISION) * col_scale[None, :]
        grad = tl.exp(logits - lse[:, None]) * factor[:, None]
        skip = (cols[None, :] == tcol[:, None]) | (col_ok == 0)[None, :]
        grad = tl.where(skip, 0.0, grad)
        acc += _mm(tl.trans(grad), x, CDT, ROUND, PRECISION)
    # d cos_ij / d w_j = (x_hat_i - w_hat_j cos_ij) / |w_j|: the column factor, then the
    # projection off w_j, on the accumulated rows (fp32 weights reread for it).
    acc = acc * inv[:, None]
    w32 = tl.load(w_ptr + w_offsets, mask=w_mask, other=0.0).to(tl.float32)
    radial = tl.sum(w32 * acc, axis=1) * inv * inv
    acc = acc - w32 * radial[:, None]
    g_offsets = cols.to(tl.int64)[:, None] * stride_g + dims[None, :]
    tl.store(grad_ptr + g_offsets, acc.to(grad_ptr.dtype.element_ty), mask=w_mask)


INTERPRETED: bool = not isinstance(_forward_kernel, JITFunction)
"""Whether the kernels were decorated for Triton's CPU interpreter (``TRITON_INTERPRET=1``
when this module was imported)."""
# Triton decorates its own library (tl.zeros, ...) when it is first imported: the
# interpreter only works if the variable was set before that too.
_LIBRARY_INTERPRETED = not isinstance(tl.zeros, JITFunction)


# --------------------------------------------------------------------------------- glue
class FusedForward(NamedTuple):
    """What the forward kernel leaves for the rest of the step and for the backward."""

    peak: torch.Tensor
    """``(B,)`` fp32 largest non-target logit of each row over the classes in use (-inf
    when there is none)."""
    total: torch.Tensor
    """``(B,)`` fp32 ``sum_j exp(l_ij - peak_i)`` over the non-target classes."""
    dx_dir: torch.Tensor | None
    """``(B, D)`` fp32 ``U_i = sum_j exp(l_ij - peak_i) w_j / |w_j|``, or None (not asked
    for: the backward recomputes it)."""
    inv_norms: torch.Tensor
    """``(S,)`` fp32 ``1 / |w_j|`` of the classes in use."""
    tiles: TritonTiles


def _unit_rows(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with unit steps along D (a parameter always has them: no copy)."""
    return weight if weight.stride(-1) == 1 else weight.contiguous()


def _block_d(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(tiles: TritonTiles, rows: int, used: int, dim: int, device: torch.device) -> int:
    class_tiles = triton.cdiv(used, tiles.block_c)
    cap = max(1, _SPLIT_BYTES // max(1, rows * dim * 4))
    if tiles.splits is not None:
        return max(1, min(tiles.splits, class_tiles, cap))
    if device.type != "cuda":
        return 1  # the interpreter runs programs one after another: fewest is fastest
    index = device.index if device.index is not None else torch.cuda.current_device()
    programs = 2 * _multiprocessors(index)
    want = triton.cdiv(programs, triton.cdiv(rows, tiles.block_b))
    return max(1, min(want, class_tiles, cap))


def _launch_settings(device: torch.device) -> None:
    """Refuse what cannot run, with the reason (before a launch fails obscurely)."""
    if device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            "head.backend=triton: the kernels need CUDA tensors (got "
            f"{device.type}); on the CPU set TRITON_INTERPRET=1 before triton is imported "
            "(Triton's interpreter), or use backend 'torch'"
        )
    if INTERPRETED and not _LIBRARY_INTERPRETED:
        raise RuntimeError(
            "head.backend=triton: TRITON_INTERPRET=1 was set after triton was imported; "
            "set it before anything imports triton"
        )


def _compute(dtype: torch.dtype, matmul_dtype: torch.dtype | None):
    """(tl compute dtype, round-in-interpreter flag, fp32 input precision)."""
    compute = matmul_dtype or dtype
    if compute not in _TL_DTYPES:
        raise ValueError(f"head.backend=triton reads {SUPPORTED_DTYPES} tensors, got {compute}")
    # fp32 products follow torch's own switch (off by default: exact fp32, as the torch path).
    precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return _TL_DTYPES[compute], INTERPRETED and compute != torch.float32, precision


#: Triton's ``(num_warps, num_stages)`` for a launch without options (the CUDA
#: backend's defaults): what :func:`inverse_norms` runs, and so what
#: :func:`compile_report` builds for it.
_LAUNCH_DEFAULTS = (4, 3)


def inverse_norms(weight: torch.Tensor, sampled: torch.Tensor | None) -> torch.Tensor:
    """``1 / max(|w|, eps)`` ``(S,)`` fp32 of the rows in use (``sampled`` ``(S,)``, or all)."""
    _launch_settings(weight.device)
    used = weight.shape[0] if sampled is None else sampled.shape[0]
    out = torch.empty(used, dtype=torch.float32, device=weight.device)
    if used == 0:
        return out
    block_r = 16
    _inverse_norms_kernel[(triton.cdiv(used, block_r),)](
        weight, weight if sampled is None else sampled, out, used, weight.shape[1],
        weight.stride(0), _NORM_EPS,
        BLOCK_R=block_r, BLOCK_D=min(_block_d(weight.shape[1]), 256), HAS_IDX=sampled is not None,
    )  # fmt: skip
    return out


def _forward_stats(
    xn: torch.Tensor,
    weight: torch.Tensor,
    sampled: torch.Tensor | None,
    target_col: torch.Tensor,
    inv_norms: torch.Tensor,
    scale: float,
    matmul_dtype: torch.dtype | None,
    tiles: TritonTiles,
    with_u: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run the forward kernel and merge its splits: ``(peak, total, U or None)``."""
    rows, dim = xn.shape
    used = inv_norms.shape[0]
    if rows == 0:  # an empty global batch: nothing to launch
        empty = xn.new_zeros(0, dtype=torch.float32)
        return empty, empty, xn.new_zeros((0, dim), dtype=torch.float32) if with_u else None
    splits = _num_splits(tiles, rows, used, dim, xn.device)
    per_split = triton.cdiv(triton.cdiv(used, tiles.block_c), splits) * tiles.block_c
    splits = triton.cdiv(used, per_split)  # no empty split
    maxes = torch.empty((rows, splits), dtype=torch.float32, device=xn.device)
    sums = torch.empty_like(maxes)
    partial_u = (
        torch.empty((rows, splits, dim), dtype=torch.float32, device=xn.device) if with_u else maxes
    )
    cdt, round_, precision = _compute(xn.dtype, matmul_dtype)
    _forward_kernel[(triton.cdiv(rows, tiles.block_b), splits)](
        xn, weight, weight if sampled is None else sampled, inv_norms, target_col, maxes, sums,
        partial_u, rows, used, dim, xn.stride(0), weight.stride(0), per_split, float(scale),
        BLOCK_B=tiles.block_b, BLOCK_C=tiles.block_c, BLOCK_D=_block_d(dim),
        HAS_IDX=sampled is not None, WITH_U=with_u, CDT=cdt, ROUND=round_, PRECISION=precision,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    if splits == 1:
        return maxes[:, 0], sums[:, 0], partial_u[:, 0] if with_u else None
    peak = maxes.amax(dim=1)
    # A split where a row has no class (sum 0, max -inf) weighs 0, never exp(nan).
    weights = torch.where(sums > 0, torch.exp(maxes - peak[:, None]), 0.0)
    total = (sums * weights).sum(dim=1)
    u = torch.bmm(weights.unsqueeze(1), partial_u).squeeze(1) if with_u else None
    return peak, total, u


def fused_forward(
    xn: torch.Tensor,
    weight: torch.Tensor,
    sampled: torch.Tensor | None,
    target_col: torch.Tensor,
    scale: float,
    matmul_dtype: torch.dtype | None,
    tiles: TritonTiles | None,
    with_dx: bool,
) -> FusedForward:
    """The non-target statistics of every row over the classes in use.

    Args:
        xn: ``(B, D)`` normalised embeddings (contiguous rows).
        weight: ``(C_local, D)`` the shard's centres (K = 1), not normalised.
        sampled: ``(S,)`` int64 local classes in use, or None for all.
        target_col: ``(B,)`` int64 column of each row's target among the classes in use
            (excluded from the statistics), -1 where this rank does not own it.
        scale: the logit scale s.
        matmul_dtype: operand dtype of the products (None: ``xn``'s).
        tiles: launch settings (None: :func:`default_tiles`).
        with_dx: also accumulate ``U`` for the embedding gradient (see the module
            docstring; ignored, i.e. left to the backward, when
            ``tiles.dx_in_forward`` is False).
    """
    _launch_settings(xn.device)
    tiles = tiles or default_tiles(xn.shape[1], matmul_dtype or xn.dtype)
    # The kernels take a row stride and unit steps along D.
    xn, weight, target_col = xn.contiguous(), _unit_rows(weight), target_col.contiguous()
    inv = inverse_norms(weight, sampled)
    peak, total, u = _forward_stats(
        xn, weight, sampled, target_col, inv, scale, matmul_dtype, tiles,
        with_dx and tiles.dx_in_forward,
    )  # fmt: skip
    return FusedForward(peak, total, u, inv, tiles)


def fused_backward(
    fused: FusedForward,
    xn: torch.Tensor,
    weight: torch.Tensor,
    sampled: torch.Tensor | None,
    target_col: torch.Tensor,
    log_sum_exp: torch.Tensor,
    row_factor: torch.Tensor,
    scale: float,
    matmul_dtype: torch.dtype | None,
    grad_xn: torch.Tensor | None,
    grad_rows: torch.Tensor | None,
) -> None:
    """The non-target entries' gradients, added to ``grad_xn`` ``(B, D)`` and written
    to every row of ``grad_rows`` ``(S, D)`` (either may be None: not wanted).

    ``log_sum_exp`` ``(B,)`` is the global one (+inf on skipped rows) and
    ``row_factor`` ``(B,)`` is ``scale * d loss / d logit`` per row (0 on skipped rows),
    so that ``d loss / d cos_ij = row_factor_i * p_ij`` off the target.
    """
    tiles = fused.tiles
    xn, weight, target_col = xn.contiguous(), _unit_rows(weight), target_col.contiguous()
    lse = log_sum_exp.to(torch.float32).contiguous()
    factor = row_factor.to(torch.float32).contiguous()
    if grad_xn is not None:
        u = fused.dx_dir
        if u is None:  # FlashAttention-2's layout: recompute it now
            _, _, u = _forward_stats(
                xn, weight, sampled, target_col, fused.inv_norms, scale, matmul_dtype, tiles,
                with_u=True,
            )  # fmt: skip
        # p_ij = exp(l_ij - peak_i) * exp(peak_i - lse_i); skipped rows: exp(-inf) = 0.
        coef = factor * torch.exp(fused.peak - lse)
        grad_xn.addcmul_(u.to(grad_xn.dtype), coef.to(grad_xn.dtype)[:, None])
    if grad_rows is None:
        return
    rows, dim = xn.shape
    used = fused.inv_norms.shape[0]
    cdt, round_, precision = _compute(xn.dtype, matmul_dtype)
    _weight_grad_kernel[(triton.cdiv(used, tiles.grad_block_c),)](
        xn, weight, weight if sampled is None else sampled, fused.inv_norms, target_col, lse,
        factor, grad_rows, rows, used, dim, xn.stride(0), weight.stride(0), grad_rows.stride(0),
        float(scale),
        BLOCK_C=tiles.grad_block_c, BLOCK_B=tiles.grad_block_b, BLOCK_D=_block_d(dim),
        HAS_IDX=sampled is not None, CDT=cdt, ROUND=round_, PRECISION=precision,
        num_warps=tiles.grad_num_warps, num_stages=tiles.grad_num_stages,
    )  # fmt: skip


# ----------------------------------------------------------------------------- self-test
def self_test(
    device: torch.device,
    dtype: torch.dtype,
    dim: int,
    matmul_dtype: torch.dtype | None,
    tiles: TritonTiles | None = None,
) -> str | None:
    """Compile the kernels for these settings and check them on a tiny problem (37
    classes, sampled and not, 21 rows) against float64 torch arithmetic on the same
    operands (rounded to the product dtype as the kernels round them). Returns None when
    they agree, else what went wrong (a compile or launch error, or a mismatch). Reads
    values back: call it once, outside the training step."""
    compute = matmul_dtype or dtype
    # Left: fp32 accumulation (tf32 products if torch allows them), and the bf16/fp16
    # rounding of the second product's probabilities.
    tf32 = compute == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    tol = 2e-2 if compute != torch.float32 or tf32 else 1e-4
    lse_tol = 2e-2 if tf32 else 1e-4  # the logits' operands are the reference's
    try:
        generator = torch.Generator().manual_seed(0)
        rows, classes, scale = 21, 37, 16.0
        x = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
        w_all = torch.randn(classes, dim, generator=generator, dtype=torch.float64).to(dtype)
        xn = (x / x.norm(dim=1, keepdim=True)).to(device=device, dtype=dtype)
        wd = w_all.to(device)
        target = torch.randint(-1, classes, (rows,), generator=generator)
        factor = torch.linspace(0.5, 1.5, rows, dtype=torch.float64)
        x_op = xn.cpu().to(compute).double()  # the operands as the kernels multiply them
        for used in (None, torch.arange(1, classes, 2)):
            w = (w_all if used is None else w_all[used]).double()
            w_op = (w_all if used is None else w_all[used]).to(compute).double()
            inv = 1.0 / w.norm(dim=1)
            tcol = target if used is None else torch.where(target >= 0, target // 2, -1)
            tcol = torch.where(tcol < w.shape[0], tcol, -1)
            logits = scale * (x_op @ w_op.t()) * inv
            logits[torch.arange(rows)[tcol >= 0], tcol[tcol >= 0]] = -math.inf
            peak = logits.amax(dim=1)
            lse = peak + torch.exp(logits - peak[:, None]).sum(dim=1).log()
            g = factor[:, None] * torch.exp(logits - lse[:, None]) * inv
            want_dx = g @ w_op
            a = g.t() @ x_op
            want_dw = a - w * ((w * a).sum(dim=1) * inv * inv)[:, None]

            idx = None if used is None else used.to(device)
            tc = tcol.to(device)
            fused = fused_forward(xn, wd, idx, tc, scale, matmul_dtype, tiles, with_dx=True)
            grad_xn = torch.zeros_like(xn)
            grad_rows = torch.empty((w.shape[0], dim), dtype=dtype, device=device)
            fused_backward(
                fused, xn, wd, idx, tc, lse.float().to(device), factor.float().to(device),
                scale, matmul_dtype, grad_xn, grad_rows,
            )  # fmt: skip
            got_lse = fused.peak.double().cpu() + fused.total.double().cpu().log()
            for name, got, want in (
                ("log-sum-exp", got_lse, lse),
                ("embedding gradient", grad_xn.double().cpu(), want_dx),
                ("weight gradient", grad_rows.double().cpu(), want_dw),
            ):
                err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
                if not err <= (lse_tol if name == "log-sum-exp" else tol):
                    where = "all classes" if used is None else "sampled classes"
                    return f"{name} off by {err:.2e} (relative) on {where}"
    except Exception as exc:  # compile, launch or resource errors: report them, never crash
        return f"{type(exc).__name__}: {exc}"
    return None


# -------------------------------------------------------------------- compile report
_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
SM90_SHARED_BYTES = 227 * 1024  # the most shared memory one block may use on H100/H200


def compile_report(
    dim: int,
    product_dtype: torch.dtype,
    weight_dtype: torch.dtype = torch.float32,
    tiles: TritonTiles | None = None,
    arch: int = 90,
) -> dict[str, dict[str, int]]:
    """Compile the three kernels for an NVIDIA GPU of compute capability ``arch`` (90:
    H100/H200) without one, and read ptxas's resource usage from the cubins with the
    ``cuobjdump`` that ships with triton. Returns, per kernel (``inverse_norms``,
    ``forward``, ``forward_sampled``, ``weight_grad``, ``weight_grad_sampled``):
    ``registers`` a thread, ``spill_bytes`` (local memory a thread: spilled registers)
    and ``shared_bytes`` (what a block needs at launch). Needs compiled kernels: not
    under ``TRITON_INTERPRET=1``."""
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRETED:
        raise RuntimeError("compile_report needs compiled kernels: unset TRITON_INTERPRET")
    tiles = tiles or default_tiles(dim, product_dtype)
    cdt = _TL_DTYPES[product_dtype]
    wp = _PTR[weight_dtype]
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    target = GPUTarget("cuda", arch, 32)
    common = dict(ROUND=False, PRECISION="ieee", BLOCK_D=_block_d(dim))

    def build(fn, signature: dict, constants: dict, warps: int, stages: int) -> dict[str, int]:
        signature = {**signature, **{name: "constexpr" for name in constants}}
        source = ASTSource(fn=fn, signature=signature, constexprs=constants)
        kernel = triton.compile(
            source, target=target, options={"num_warps": warps, "num_stages": stages}
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.cubin")
            with open(path, "wb") as handle:
                handle.write(kernel.asm["cubin"])
            usage = subprocess.run(
                [cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True
            ).stdout
        found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
        if found is None:
            raise RuntimeError(f"no resource usage in cuobjdump's output: {usage!r}")
        return dict(
            registers=int(found.group(1)),
            spill_bytes=int(found.group(2)),
            shared_bytes=int(kernel.metadata.shared),
        )

    def index(sampled: bool) -> str:
        return "*i64" if sampled else wp

    scalars = dict(num_rows="i32", num_used="i32", dim="i32", stride_x="i32", stride_w="i32")
    report = {
        "inverse_norms": build(
            _inverse_norms_kernel,
            dict(w_ptr=wp, idx_ptr=wp, out_ptr="*fp32", num_used="i32", dim="i32",
                 stride_w="i32", eps="fp32"),
            dict(BLOCK_R=16, BLOCK_D=min(_block_d(dim), 256), HAS_IDX=False),
            *_LAUNCH_DEFAULTS,  # inverse_norms launches it without options
        ),
    }  # fmt: skip
    for sampled in (False, True):
        suffix = "_sampled" if sampled else ""
        report["forward" + suffix] = build(
            _forward_kernel,
            dict(x_ptr=wp, w_ptr=wp, idx_ptr=index(sampled), inv_ptr="*fp32", tcol_ptr="*i64",
                 max_ptr="*fp32", sum_ptr="*fp32", u_ptr="*fp32", **scalars,
                 classes_per_split="i32", scale="fp32"),
            dict(BLOCK_B=tiles.block_b, BLOCK_C=tiles.block_c, HAS_IDX=sampled,
                 WITH_U=tiles.dx_in_forward, CDT=cdt, **common),
            tiles.num_warps, tiles.num_stages,
        )  # fmt: skip
        report["weight_grad" + suffix] = build(
            _weight_grad_kernel,
            dict(x_ptr=wp, w_ptr=wp, idx_ptr=index(sampled), inv_ptr="*fp32", tcol_ptr="*i64",
                 lse_ptr="*fp32", factor_ptr="*fp32", grad_ptr=wp, **scalars,
                 stride_g="i32", scale="fp32"),
            dict(BLOCK_C=tiles.grad_block_c, BLOCK_B=tiles.grad_block_b, HAS_IDX=sampled,
                 CDT=cdt, **common),
            tiles.grad_num_warps, tiles.grad_num_stages,
        )  # fmt: skip
    return report
