"""The triton section: an autotune of the triton backend's tiles. Each forward-kernel
and each weight-gradient-kernel candidate is timed alone, then a whole step with the
best of each, in both embedding-gradient layouts, next to the three bare bf16 products;
the fastest is written as ``recommended_tiles``."""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Any

import torch

from bench.common import bare_products
from bench.gpu_check.clock import Clock
from bench.gpu_check.plan import Plan, check_cap
from partial_fc.backend import interpreter_requested, triton_missing

# Candidates, most promising first: the first of each compiles for sm_90 at D 512 with
# bf16 operands without spilling registers (ptxas's report, no GPU needed; the figures
# after each are registers / bytes spilled a thread); all fit in an H100/H200 SM's
# 227 KiB of shared memory. The smoke run tries the first of each only.
# Forward: (block_b, block_c, num_warps, num_stages).
FORWARD_CANDIDATES = (
    (32, 32, 8, 2),  # 196 / 0 (partial_fc.triton_ce.default_tiles)
    (32, 32, 8, 1),  # 214 / 0
    (32, 16, 8, 1),  # 218 / 0
    (16, 32, 4, 1),  # 237 / 0
    (32, 64, 8, 2),  # 255 / 96
    (32, 32, 4, 2),  # 255 / 224
    (16, 64, 4, 2),  # 255 / 280
    (64, 32, 8, 1),  # 255 / 744
)
# Weight gradient: (grad_block_c, grad_block_b, grad_num_warps, grad_num_stages).
WEIGHT_GRAD_CANDIDATES = (
    (16, 32, 8, 1),  # 179 / 0 (default_tiles)
    (16, 16, 4, 1),  # 251 / 0
    (32, 16, 8, 1),  # 255 / 24
    (32, 32, 8, 1),  # 255 / 40
    (16, 32, 4, 1),  # 255 / 104
    (32, 32, 8, 2),  # 255 / 144
    (16, 64, 8, 1),  # 255 / 152
    (32, 64, 8, 2),  # 255 / 1328
)


def triton_unavailable(clock: Clock) -> str | None:
    """Why the triton backend cannot run on the clock's device, or None."""
    missing = triton_missing()
    if missing is not None:
        return missing
    if not clock.cuda and not interpreter_requested():
        return "no CUDA device and TRITON_INTERPRET is not set"
    return None


def run(plan: Plan, clock: Clock, deadline: float, out: dict[str, Any]) -> None:
    """Autotune the triton backend's tiles (see the module docstring); fills ``out``."""
    why = triton_unavailable(clock)
    if why is not None:
        out["not_run"] = why
        return
    from partial_fc import triton_ce
    from partial_fc.triton_ce import FusedForward, TritonTiles

    device = clock.device
    batch, dim, classes = plan.triton_batch, plan.triton_dim, plan.triton_classes
    scale, low = 64.0, torch.bfloat16
    out.update(c_local=classes, batch=batch, dim=dim, matmul="bf16", repeats=plan.triton_repeats)
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, dim, generator=generator, device=device)
    xn = x / x.norm(dim=1, keepdim=True)
    weight = torch.randn(classes, dim, generator=generator, device=device) * 0.01
    target = torch.randint(0, classes, (batch,), generator=generator, device=device)
    factor = torch.full((batch,), scale / batch, device=device)
    grad_rows = torch.empty_like(weight)
    base = triton_ce.default_tiles(dim, low)
    first = triton_ce.fused_forward(xn, weight, None, target, scale, low, base, with_dx=False)
    lse = first.peak + first.total.log()
    errors: list[str] = out.setdefault("errors", [])

    def forward(tiles: TritonTiles) -> object:
        return triton_ce.fused_forward(xn, weight, None, target, scale, low, tiles, with_dx=True)

    def weight_grad(tiles: TritonTiles) -> None:
        fused = FusedForward(first.peak, first.total, None, first.inv_norms, tiles)
        triton_ce.fused_backward(
            fused, xn, weight, None, target, lse, factor, scale, low, None, grad_rows
        )

    kernels = (
        ("forward", FORWARD_CANDIDATES, forward,
         lambda c: dataclasses.replace(base, block_b=c[0], block_c=c[1], num_warps=c[2],
                                       num_stages=c[3])),
        ("weight_grad", WEIGHT_GRAD_CANDIDATES, weight_grad,
         lambda c: dataclasses.replace(base, grad_block_c=c[0], grad_block_b=c[1],
                                       grad_num_warps=c[2], grad_num_stages=c[3])),
    )  # fmt: skip
    best: dict[str, TritonTiles] = {}
    # Compiling a candidate takes seconds: each kernel gets 40% of the section's time
    # (its first candidate always runs), the whole steps the rest.
    start = time.monotonic()
    for share, (kernel, candidates, call, tiles_of) in zip((0.4, 0.8), kernels, strict=True):
        results: list[dict[str, Any]] = out.setdefault(kernel, [])
        until = start + share * (deadline - start)
        for candidate in candidates[: plan.triton_candidates]:
            tiles = tiles_of(candidate)
            row: dict[str, Any] = dict(tiles=dataclasses.asdict(tiles), ms=None, error=None)
            if results and time.monotonic() > until:
                row["error"] = "skipped: the section's time share for this kernel ran out"
            else:
                try:
                    row["ms"] = clock.median_s(partial(call, tiles), plan.triton_repeats) * 1e3
                except Exception as exc:  # out of shared memory or registers, compile errors
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            results.append(row)
        timed = [r for r in results if r["ms"] is not None]
        if not timed:
            raise RuntimeError(f"no {kernel} candidate ran: {results[0]['error']}")
        best[kernel] = TritonTiles(**min(timed, key=lambda r: r["ms"])["tiles"])
    fwd, grad = best["forward"], best["weight_grad"]
    tuned = dataclasses.replace(
        fwd, grad_block_c=grad.grad_block_c, grad_block_b=grad.grad_block_b,
        grad_num_warps=grad.grad_num_warps, grad_num_stages=grad.grad_num_stages,
    )  # fmt: skip

    operand = torch.randn(batch, classes, generator=generator, device=device).to(low)
    bare = partial(bare_products, x.to(low), weight.to(low), operand)
    bare_s = clock.median_s(bare, plan.triton_repeats)
    del operand
    grad_mib = classes * dim * 4 / 2**20
    layouts: list[dict[str, Any]] = out.setdefault("layouts", [])
    for dx_in_forward in (True, False):
        check_cap(deadline, f"the whole step with dx_in_forward={dx_in_forward}")
        tiles = dataclasses.replace(tuned, dx_in_forward=dx_in_forward)
        grad_xn = torch.zeros_like(xn)

        def step(tiles: TritonTiles = tiles, grad_xn: torch.Tensor = grad_xn) -> None:
            fused = triton_ce.fused_forward(
                xn, weight, None, target, scale, low, tiles, with_dx=True
            )
            triton_ce.fused_backward(
                fused, xn, weight, None, target, lse, factor, scale, low, grad_xn, grad_rows
            )

        try:
            step_s = clock.median_s(step, plan.triton_repeats)
            extra = clock.memory_growth_mib(step)  # the gradient buffer exists already
        except Exception as exc:
            errors.append(f"dx_in_forward={dx_in_forward}: {type(exc).__name__}: {exc}")
            continue
        layouts.append(
            dict(
                dx_in_forward=dx_in_forward,
                step_ms=step_s * 1e3,
                bare_ms=bare_s * 1e3,
                over_bare=step_s / bare_s,
                extra_mib=extra,
                weight_grad_mib=grad_mib,
            )
        )
    fastest = min(layouts, key=lambda r: r["step_ms"], default=None)
    if fastest is not None:
        recommended = dataclasses.replace(tuned, dx_in_forward=fastest["dx_in_forward"])
        out["recommended_tiles"] = dataclasses.asdict(recommended)
    if errors:
        raise RuntimeError("; ".join(errors))
