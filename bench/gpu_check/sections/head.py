"""The head section: :class:`partial_fc.PartialFC` forward+backward against the three
bare products and a dense head, per C_local, product dtype, sample rate and backend."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from bench.common import bare_products, dense_arcface_step, head_step
from bench.gpu_check.clock import Clock
from bench.gpu_check.plan import Plan, check_cap
from bench.gpu_check.sections.triton_autotune import triton_unavailable
from partial_fc import ArcFace, PartialFC
from partial_fc.sampling import num_sampled_classes


def head_rows(
    plan: Plan,
    clock: Clock,
    inputs: dict[str, torch.Tensor],
    matmul: str,
    errors: list[str],
) -> list[dict[str, Any]]:
    """One C_local and product dtype: every sample rate's row, per backend. A head that
    cannot be built is recorded in ``errors`` and the other rows are still measured."""
    x, labels, weight = inputs["x"], inputs["labels"], inputs["weight"]
    batch, dim = x.shape
    classes = weight.shape[0]
    low = torch.bfloat16 if matmul == "bf16" else None
    operand = low or torch.float32
    calls: dict[str, Callable[[], object]] = {
        "bare": partial(
            bare_products, x.to(operand), weight.to(operand), inputs["grad_logits"].to(operand)
        ),
        "dense": partial(dense_arcface_step, x, inputs["dense_weight"], labels, low),
    }
    backends = [b for b in plan.head_backends if b == "torch" or not triton_unavailable(clock)]
    for backend in backends:
        for rate in plan.head_rates:
            try:
                head = PartialFC(
                    classes, dim, ArcFace(64.0, 0.5), sample_rate=rate, matmul_dtype=low,
                    max_local_batch=batch, backend=backend, device=clock.device,
                )  # fmt: skip
            except Exception as exc:  # e.g. the kernels' self-test failed: keep the rest
                errors.append(f"{backend} head, rate {rate}, {matmul}: {exc}")
                continue
            calls[f"{backend} {rate}"] = partial(head_step, head, x, labels)
    memory = {name: clock.memory_growth_mib(fn) for name, fn in calls.items()}
    times = clock.interleaved_medians(calls, plan.head_repeats)
    grad_mib = classes * dim * 4 / 2**20  # the fp32 weight shard's gradient
    rows = []
    for backend in backends:
        for rate in plan.head_rates:
            name = f"{backend} {rate}"
            if name not in calls:
                continue
            head_mem = memory[name]
            rows.append(
                dict(
                    c_local=classes,
                    batch=batch,
                    matmul=matmul,
                    sample_rate=rate,
                    backend=backend,
                    head_s=times[name],
                    bare_s=times["bare"],
                    dense_s=times["dense"],
                    head_over_bare=times[name] / times["bare"],
                    dense_over_bare=times["dense"] / times["bare"],
                    head_mem_mib=head_mem,
                    weight_grad_mib=grad_mib,
                    head_mem_over_grad=None if head_mem is None else head_mem / grad_mib,
                    # Beyond the gradient the step allocates (dense, or the sampled rows').
                    head_extra_mib=None
                    if head_mem is None
                    else head_mem - num_sampled_classes(classes, rate, batch) * dim * 4 / 2**20,
                    dense_mem_mib=memory["dense"],
                )
            )
    return rows


def run(plan: Plan, clock: Clock, deadline: float, out: dict[str, Any]) -> None:
    """Head vs three bare products vs dense head; appends rows to ``out["rows"]``."""
    device = clock.device
    batch, dim = plan.head_batch, plan.head_dim
    out.update(batch=batch, dim=dim, margin="ArcFace(64, 0.5)", repeats=plan.head_repeats)
    out["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32 if clock.cuda else None
    rows: list[dict[str, Any]] = out.setdefault("rows", [])
    errors: list[str] = out.setdefault("errors", [])
    if "triton" not in plan.head_backends:
        out["triton_rows"] = (
            "skipped in the smoke run: Triton's CPU interpreter would take minutes at these "
            "sizes (the triton section runs the kernels at toy size)"
        )
    elif why := triton_unavailable(clock):
        out["triton_rows"] = f"not run: {why}"
    # Drawn on the device: a (1024, 256k) CPU draw and copy would eat into the time cap.
    generator = torch.Generator(device=device).manual_seed(0)
    for classes in plan.head_classes:
        weight = torch.randn(classes, dim, generator=generator, device=device) * 0.01
        inputs = dict(
            x=torch.randn(batch, dim, generator=generator, device=device),
            labels=torch.randint(0, classes, (batch,), generator=generator, device=device),
            weight=weight,
            grad_logits=torch.randn(batch, classes, generator=generator, device=device),
            dense_weight=weight.clone().requires_grad_(True),
        )
        for matmul in ("fp32", "bf16"):
            what = f"C_local {classes}, {matmul} products"
            check_cap(deadline, f"the head at {what}")
            try:
                rows.extend(head_rows(plan, clock, inputs, matmul, errors))
            except Exception as exc:
                # One configuration failing (e.g. out of memory) keeps the others.
                errors.append(f"{what}: {type(exc).__name__}: {exc}")
            clock.release()
        del inputs, weight
        clock.release()
    if errors:
        raise RuntimeError("; ".join(errors))
