"""Freezing BatchNorm: always normalise with the running statistics.

A frozen backbone's output for a sample does not depend on the rest of the
batch, which is what a 1-rank vs N-rank equivalence test needs (each rank sees
a different sub-batch). Unlike ``model.eval()``, the freeze survives
``model.train()``: dropout, drop path and token masking stay in training mode.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class FrozenBatchNorm(nn.Module):
    """BatchNorm that normalises with fixed ``running_mean``/``running_var``
    in training and eval alike; the affine ``weight``/``bias`` stay learnable
    (with the ``requires_grad`` of the layer it replaces). Shape-preserving
    ``(B, C, ...)``."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("can only freeze a BatchNorm that tracks running statistics")
        self.eps = bn.eps
        c = bn.num_features
        self.weight = bn.weight if bn.affine else None
        self.bias = bn.bias if bn.affine else None
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        # kept (never incremented) so the state_dict has BatchNorm's keys: frozen and
        # unfrozen models save and load the same files
        count = bn.num_batches_tracked
        self.register_buffer(
            "num_batches_tracked",
            count.detach().clone() if count is not None else torch.tensor(0, dtype=torch.long),
        )
        self.num_features = c

    def _load_from_state_dict(
        self, state_dict: dict, prefix: str, *args: object, **kwargs: object
    ) -> None:
        # a counter, not a weight: files without it load (as into BatchNorm)
        state_dict.setdefault(prefix + "num_batches_tracked", self.num_batches_tracked)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def freeze_batchnorm(
    module: nn.Module, select: Callable[[str], bool] | None = None, prefix: str = ""
) -> nn.Module:
    """Replace BatchNorm layers in ``module`` (in place) by :class:`FrozenBatchNorm`
    layers holding their current statistics and parameters: every one, or those whose
    qualified name (as in ``module.named_modules()``) ``select`` accepts.

    Returns ``module`` (or the replacement when ``module`` is itself a selected
    BatchNorm layer). ``prefix`` is ``module``'s own name, for the recursion.
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return FrozenBatchNorm(module) if select is None or select(prefix) else module
    for name, child in module.named_children():
        setattr(module, name, freeze_batchnorm(child, select, f"{prefix}.{name}".lstrip(".")))
    return module
