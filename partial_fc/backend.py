"""Which implementation runs the head's non-target logits: torch or the fused Triton kernels.

``"torch"`` is :mod:`partial_fc.softmax_ce`'s chunked path, the reference, which runs
everywhere and supports every option. ``"triton"`` is :mod:`partial_fc.triton_ce`: CUDA
tensors (or Triton's CPU interpreter, ``TRITON_INTERPRET=1``), one centre per class,
no inter-class filtering, a margin whose registry entry allows it
(:mod:`partial_fc.registry`: all but CurricularFace, whose hard negatives change the
non-target logits), fp32/bf16/fp16 tensors. ``"auto"`` runs triton where it applies, triton
imports and the products are 16-bit (:func:`auto_picks_triton`), torch elsewhere,
without a word. Everything here works without triton installed: it only looks for it.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Literal

import torch

from partial_fc.registry import entry_of, margin_entry

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")


@functools.cache
def triton_missing() -> str | None:
    """Why triton cannot be used here (not installed, or fails to import), or None."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except ImportError as exc:
        return f"triton is not importable ({exc}); install it (pip install triton) or use 'torch'"
    except Exception as exc:  # a broken install fails in many ways
        return f"importing triton failed ({type(exc).__name__}: {exc}); use 'torch'"
    return None


def interpreter_requested() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run on the CPU through numpy (slow; tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_unsupported(
    *,
    num_subcenters: int = 1,
    filtering: bool = False,
    margin: object = None,
    loss: str | None = None,
    dtype: torch.dtype | None = None,
) -> str | None:
    """Which of these options the triton backend does not implement (they run on the
    torch path), or None. ``margin`` is a margin object, ``loss`` a registered name of one
    (the registry says whether triton runs it)."""

    reasons = []
    if num_subcenters > 1:
        reasons.append(f"sub-centres (num_subcenters={num_subcenters})")
    if filtering:
        reasons.append("inter-class filtering")
    entry = margin_entry(loss) if loss is not None else None
    if entry is None and margin is not None:
        entry = entry_of(margin)
    if entry is not None and not entry.triton:
        reasons.append(f"{entry.cls.__name__} ({entry.no_triton_why})")
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        reasons.append(f"{dtype} weights (fp32, bf16 or fp16 only)")
    return "; ".join(reasons) or None


def auto_picks_triton(product_dtype: torch.dtype) -> bool:
    """Whether ``"auto"`` runs triton for products in ``product_dtype`` (``matmul_dtype``,
    or the weight's dtype without it): bf16 and fp16 only. fp32 operands run on CUDA
    cores in Triton as in torch (tensor cores need 16-bit or tf32 operands), and compiled
    for sm_90 at D 512 every tile configuration tried spills 9-28 KB a thread to local
    memory (ptxas, Triton 3.9): until a GPU has measured it, fp32 stays on torch.
    An explicit ``"triton"`` runs fp32 all the same."""
    return product_dtype in (torch.bfloat16, torch.float16)
