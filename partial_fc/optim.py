"""Optimizers for the head that leave unsampled class centres untouched.

With ``sample_rate < 1`` a step uses only some classes. A dense optimizer would
still apply weight decay and momentum to every row (``arcface_torch`` v2 does),
moving centres that took no part in the step. These optimizers update only the
rows :meth:`PartialFC.touched_rows` reports — the classes used since the last
``step``/``zero_grad`` (so gradient accumulation updates the union of its
micro-steps' classes) — and leave every other row and its optimizer state
bit-for-bit unchanged. With ``sample_rate == 1`` they are the dense updates of
``torch.optim.SGD`` / ``torch.optim.AdamW``.

Per-parameter state is row-indexed (leading dimension = rows of ``weight``),
so it can be re-sliced by global class when a run resumes on another world
size: SGD keeps ``momentum_buffer`` ``(rows, D)``; AdamW keeps ``exp_avg`` and
``exp_avg_sq`` ``(rows, D)`` and a per-row ``row_step`` ``(rows,)`` — a row's bias
correction counts only the steps that row took part in. (Not named ``step``:
``Optimizer.load_state_dict`` leaves an entry of that name on the CPU.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from partial_fc.head import PartialFC


class _RowSparseOptimizer(torch.optim.Optimizer):
    """Shared plumbing: one parameter (``head.weight``) updated on the touched rows.

    Like torch's fused optimizers, ``step`` honours a ``found_inf`` attribute (a
    0-dim tensor, non-zero to skip; :class:`torch.amp.GradScaler` sets it, and so
    does a trainer that skips non-finite steps): the update is then a no-op decided
    on the device, with no host synchronisation. The skipped step leaves every row
    and its state unchanged (and never reads the non-finite gradient's values into
    them).
    """

    def __init__(self, head: PartialFC, defaults: dict) -> None:
        super().__init__([head.weight], defaults)
        self._head = head

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._head.clear_touched()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rows = self._head.touched_rows()
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if rows is not None and rows.numel() == 0:
                    raise RuntimeError(
                        f"{type(self).__name__}.step: head.weight has a gradient but no "
                        "backward since the last step()/zero_grad() recorded which sampled "
                        "rows it covers (sample_rate < 1); call zero_grad() before the "
                        "forward or between step() and the next forward, not between "
                        "backward() and step()"
                    )
                state = self.state[param]
                if not state:
                    self._init_state(param, state)
                # 1 to apply the update, 0 to skip it (found_inf set): a device value.
                go = torch.ones((), dtype=param.dtype, device=param.device)
                if found_inf is not None:
                    go = (found_inf.to(param.device) == 0).to(param.dtype)
                if rows is None:
                    self._update(param, self._gated(param.grad, go), state, group, go)
                    continue
                # Update a compact copy of the touched rows, then write it back. Rows
                # used by several micro-steps appear several times: their copies are
                # computed from the same values, so every write-back is identical.
                sub_param = param.index_select(0, rows)
                sub_state = {name: value.index_select(0, rows) for name, value in state.items()}
                grad = self._gated(param.grad.index_select(0, rows), go)
                self._update(sub_param, grad, sub_state, group, go)
                param.index_copy_(0, rows, sub_param)
                for name, value in sub_state.items():
                    state[name].index_copy_(0, rows, value)
        self._head.clear_touched()
        return loss

    @staticmethod
    def _gated(grad: torch.Tensor, go: torch.Tensor) -> torch.Tensor:
        """``grad``, or zeros when the step is skipped (a non-finite gradient must not
        reach the state through ``0 * inf = nan``)."""
        return torch.where(go > 0, grad, 0.0)

    def _init_state(self, param: torch.Tensor, state: dict) -> None:
        raise NotImplementedError

    def _update(
        self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, go: torch.Tensor
    ) -> None:
        """Update ``param`` and ``state`` in place from ``grad`` (all with the same rows),
        scaled by ``go`` (0-dim, 1 or 0): with ``go = 0`` (and ``grad = 0``) every
        value stays bit-identical."""
        raise NotImplementedError


class PartialFCSGD(_RowSparseOptimizer):
    """SGD with momentum and (coupled) weight decay on the touched rows of ``head.weight``:
    ``g = grad + wd * w; buf = momentum * buf + g; w -= lr * buf``
    (``torch.optim.SGD`` with dampening 0; a row's buffer starts at zero)."""

    def __init__(
        self,
        head: PartialFC,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(
                f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}"
            )
        if nesterov and momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        super().__init__(
            head, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        )

    def _init_state(self, param: torch.Tensor, state: dict) -> None:
        state["momentum_buffer"] = torch.zeros_like(param)

    def _update(self, param, grad, state, group, go) -> None:
        # grad is 0 when skipped; the decay term is scaled by go, so g = 0 then.
        if group["weight_decay"]:
            grad = grad.addcmul_(param, go, value=group["weight_decay"])
        if group["momentum"]:
            buf = state["momentum_buffer"]
            # momentum * buf + g, or buf itself (factor 1) when skipped.
            buf.mul_(go * group["momentum"] + (1 - go)).add_(grad)
            grad = grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        param.addcmul_(grad, go, value=-group["lr"])


class PartialFCAdamW(_RowSparseOptimizer):
    """AdamW (decoupled weight decay) on the touched rows of ``head.weight``, with a
    per-row step count for the bias corrections; equals ``torch.optim.AdamW`` when
    every row takes part in every step."""

    def __init__(
        self,
        head: PartialFC,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(
                f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}"
            )
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        super().__init__(head, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _init_state(self, param: torch.Tensor, state: dict) -> None:
        state["exp_avg"] = torch.zeros_like(param)
        state["exp_avg_sq"] = torch.zeros_like(param)
        state["row_step"] = torch.zeros(param.shape[0], dtype=param.dtype, device=param.device)

    def _update(self, param, grad, state, group, go) -> None:
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        step = state["row_step"].add_(go)
        param.mul_(1.0 - (lr * group["weight_decay"]) * go)
        state["exp_avg"].lerp_(grad, (1.0 - beta1) * go)
        state["exp_avg_sq"].mul_(1.0 - (1.0 - beta2) * go).addcmul_(grad, grad, value=1.0 - beta2)
        # A row skipped before its first step has step 0 and zero moments: count it as
        # 1 so the bias corrections stay finite (its update is 0 either way).
        step = step.clamp_min(1.0)
        bias1 = (1.0 - beta1**step).unsqueeze(1)
        bias2_sqrt = (1.0 - beta2**step).sqrt().unsqueeze(1)
        denom = (state["exp_avg_sq"].sqrt() / bias2_sqrt).add_(group["eps"])
        param.addcdiv_((state["exp_avg"] / bias1).mul_(go), denom, value=-lr)
