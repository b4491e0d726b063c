"""Optimizers for the two parameter groups: torch's for the backbone, Partial-FC's for the head."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from configs import OptimizerConfig


def build_backbone_optimizer(
    cfg: OptimizerConfig, params: Iterable[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    """``torch.optim.SGD`` or ``AdamW`` over the backbone parameters."""
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    raise ValueError(f"optimizer.name: unknown optimizer {cfg.name!r} (sgd, adamw)")


def build_head_optimizer(cfg: OptimizerConfig, head: torch.nn.Module) -> torch.optim.Optimizer:
    """The row-sparse Partial-FC optimizer matching ``cfg.name`` for ``head.weight``."""
    from partial_fc.optim import PartialFCAdamW, PartialFCSGD

    if cfg.name == "sgd":
        return PartialFCSGD(head, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return PartialFCAdamW(
            head, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    raise ValueError(f"optimizer.name: unknown optimizer {cfg.name!r} (sgd, adamw)")
