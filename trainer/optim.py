"""Optimizers for the two parameter groups: torch's for the backbone, Partial-FC's for the head."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from configs import OptimizerConfig
from partial_fc.optim import PartialFCAdamW, PartialFCSGD


def build_backbone_optimizer(
    cfg: OptimizerConfig, params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]]
) -> torch.optim.Optimizer:
    """``torch.optim.SGD`` or ``AdamW`` over the backbone parameters: a list of
    parameters, or of parameter groups (``trainer.finetune.backbone_param_groups``:
    their own ``lr`` / ``weight_decay``, the rest from ``cfg``). Parameters that do not
    require a gradient are left out."""
    items = list(params)
    if items and isinstance(items[0], dict):
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in items]
        params = groups  # type: ignore[assignment]
        every = [p for g in groups for p in g["params"]]
    else:
        params = every = [p for p in items if p.requires_grad]  # type: ignore[assignment]
    # Fused: one kernel per parameter group, and a skipped step is decided on the
    # device (``found_inf``, see :func:`step_unless`) instead of read back by the host.
    if cfg.name == "sgd":
        optimizer = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True
        )
        if cfg.momentum:
            # The fused kernel treats a step with no buffers as the first and fills them
            # from the gradient, skipping that when found_inf is set; a skipped first
            # step would leave them uninitialised. Zeros give the same first step
            # (buf = 0 * momentum + g) and make every step alike.
            for param in every:
                optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)
        return optimizer
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            params,
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            fused=True,
        )
    raise ValueError(f"optimizer.name: unknown optimizer {cfg.name!r} (sgd, adamw)")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)`` keeping this build's implementation flags:
    the saved hyperparameters (lr, momentum, ...) and buffers come from the checkpoint,
    but ``fused``/``foreach`` stay as :func:`build_backbone_optimizer` set them, so a
    checkpoint written by a non-fused optimizer (an older version) resumes fused."""
    flags = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, flags, strict=True):
        group.update(kept)


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()``, a no-op on the device where ``skip`` (0-dim bool) is True.

    Uses the ``found_inf`` protocol of torch's fused optimizers (the one
    :class:`torch.amp.GradScaler` uses), which :mod:`partial_fc.optim` honours too:
    nothing is read back to the host. Optimizers without it raise.
    """
    if isinstance(optimizer, torch.optim.SGD | torch.optim.AdamW) and not all(
        group.get("fused") for group in optimizer.param_groups
    ):
        raise ValueError(f"step_unless needs a fused {type(optimizer).__name__} (fused=True)")
    optimizer.found_inf = skip.to(torch.float32)  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf  # type: ignore[attr-defined]


def build_head_optimizer(cfg: OptimizerConfig, head: torch.nn.Module) -> torch.optim.Optimizer:
    """The row-sparse Partial-FC optimizer matching ``cfg.name`` for ``head.weight``."""

    state_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.head_state_dtype]
    if cfg.name == "sgd":
        return PartialFCSGD(
            head,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            state_dtype=state_dtype,
        )
    if cfg.name == "adamw":
        return PartialFCAdamW(
            head,
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            state_dtype=state_dtype,
        )
    raise ValueError(f"optimizer.name: unknown optimizer {cfg.name!r} (sgd, adamw)")
