"""Optimizers for the head that leave unsampled class centres untouched.

With ``sample_rate < 1`` a step uses only some classes. A dense optimizer would
still apply weight decay and momentum to every row (``arcface_torch`` v2 does),
moving centres that took no part in the step. The head's gradient of such a step
is row-sparse (a COO tensor of the sampled rows, :mod:`partial_fc.sparse_grad`):
these optimizers update exactly the rows it lists — after gradient accumulation,
the union of the micro-steps' rows — and leave every other row and its optimizer
state bit-for-bit unchanged. A dense gradient (``sample_rate == 1``) updates every
row: the updates of ``torch.optim.SGD`` / ``torch.optim.AdamW``. Because the rows
travel with the gradient, any call order trains (``zero_grad`` before the forward
or between the forward and the backward).

Per-parameter state is row-indexed (leading dimension = rows of ``weight``),
so it can be re-sliced by global class when a run resumes on another world
size: SGD keeps ``momentum_buffer`` ``(rows, D)``; AdamW keeps ``exp_avg`` and
``exp_avg_sq`` ``(rows, D)`` and a per-row ``row_step`` ``(rows,)`` — a row's bias
correction counts only the steps that row took part in. (Not named ``step``:
``Optimizer.load_state_dict`` leaves an entry of that name on the CPU.)

``state_dtype=torch.bfloat16`` stores the momentum / moments in bf16 (half the
memory of fp32 state: at 1M classes x 512, 1 GiB instead of 2 GiB per buffer) and
computes every update in fp32 from it; each step rounds the new state once to
bf16 (8 bits of mantissa), a relative error of at most 2^-9 per step that does not
compound in the weights, which stay fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from partial_fc.head import PartialFC
from partial_fc.sparse_grad import row_gradients

_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rows per compact update on the CPU: the copies of a block of parameters and state
# (16 MiB each at D 512) stay small next to the shard (at 100k sampled rows of 1M this
# saves ~0.4 GiB of peak memory per rank), and below glibc's largest mmap threshold
# (32 MiB), so after the first step they reuse heap memory instead of faulting in
# fresh pages. A GPU updates all rows at once.
_CPU_ROW_BLOCK = 8_192


class _RowSparseOptimizer(torch.optim.Optimizer):
    """Shared plumbing: one parameter (``head.weight``) updated on the rows its
    gradient covers.

    Like torch's fused optimizers, ``step`` honours a ``found_inf`` attribute (a
    0-dim tensor, non-zero to skip; :class:`torch.amp.GradScaler` sets it, and so
    does a trainer that skips non-finite steps): the update is then a no-op decided
    on the device, with no host synchronisation. The skipped step leaves every row
    and its state unchanged (and never reads the non-finite gradient's values into
    them).
    """

    #: State entries that hold moments (stored in ``state_dtype``); others stay fp32.
    _MOMENTS: tuple[str, ...] = ()

    def __init__(self, head: PartialFC, defaults: dict, state_dtype: torch.dtype | None) -> None:
        if state_dtype is not None and state_dtype not in _STATE_DTYPES:
            raise ValueError(
                f"state_dtype must be one of {_STATE_DTYPES} (the moments' storage), "
                f"got {state_dtype}"
            )
        super().__init__([head.weight], defaults)
        self.state_dtype = state_dtype

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    self._init_state(param, state)
                # 1 to apply the update, 0 to skip it (found_inf set): a device value.
                go = torch.ones((), dtype=param.dtype, device=param.device)
                if found_inf is not None:
                    go = (found_inf.to(param.device) == 0).to(param.dtype)
                if param.grad.layout != torch.sparse_coo:
                    compute = {name: value.to(param.dtype) for name, value in state.items()}
                    self._update(param, param.grad, compute, group, go)
                    self._store(state, compute)
                    continue
                # Update compact copies of the listed rows, then write them back. A row
                # listed twice (accumulated micro-steps) has both copies computed from
                # the same values and its total gradient: identical write-backs.
                rows, grad, _ = row_gradients(param.grad)
                block = rows.shape[0] if param.is_cuda else _CPU_ROW_BLOCK
                for start in range(0, rows.shape[0], block):
                    self._update_rows(
                        param, state, rows[start : start + block],
                        grad[start : start + block], group, go,
                    )  # fmt: skip
        return loss

    def _update_rows(self, param, state, rows, grad, group, go) -> None:
        """Update ``rows`` of ``param`` and its state from their gradient ``grad``."""
        sub_param = param.index_select(0, rows)
        sub_state = {
            name: value.index_select(0, rows).to(param.dtype) for name, value in state.items()
        }
        self._update(sub_param, grad, sub_state, group, go)
        param.index_copy_(0, rows, sub_param)
        for name, value in sub_state.items():
            state[name].index_copy_(0, rows, value.to(state[name].dtype))

    @staticmethod
    def _gated(grad: torch.Tensor, go: torch.Tensor) -> torch.Tensor:
        """A copy of ``grad`` (the update works on it in place), or zeros when the step
        is skipped (a non-finite gradient must not reach the state through
        ``0 * inf = nan``)."""
        return torch.where(go > 0, grad, 0.0)

    def _store(self, state: dict, computed: dict) -> None:
        """Write the fp32 results of a dense update back into lower-precision state."""
        for name, value in computed.items():
            if value is not state[name]:
                state[name].copy_(value)

    def _new_state(self, param: torch.Tensor) -> torch.Tensor:
        """A zero moment buffer shaped like ``param``, in ``state_dtype`` (default: the
        parameter's dtype)."""
        return torch.zeros_like(param, dtype=self.state_dtype or param.dtype)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts floating state to the parameter's dtype: store moments back in
        # state_dtype, so a resumed run keeps its memory footprint.
        super().load_state_dict(state_dict)
        if self.state_dtype is None:
            return
        for state in self.state.values():
            for name in self._MOMENTS:
                if name in state:
                    state[name] = state[name].to(self.state_dtype)

    def _init_state(self, param: torch.Tensor, state: dict) -> None:
        raise NotImplementedError

    def _update(
        self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, go: torch.Tensor
    ) -> None:
        """Update ``param`` and ``state`` in place from ``grad`` (all with the same rows;
        ``grad`` is read, never written), gated by ``go`` (0-dim, 1 or 0): with ``go =
        0`` every value stays bit-identical, whatever ``grad`` holds."""
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
        state_dtype: torch.dtype | None = None,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(
                f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}"
            )
        if nesterov and momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        super().__init__(
            head,
            dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov),
            state_dtype,
        )

    _MOMENTS = ("momentum_buffer",)

    def _init_state(self, param: torch.Tensor, state: dict) -> None:
        state["momentum_buffer"] = self._new_state(param)

    def _update(self, param, grad, state, group, go) -> None:
        # torch's fused SGD kernel (the one torch.optim.SGD(fused=True) runs): one pass
        # over the rows, no copy of the gradient, and found_inf skips on the device.
        momentum = group["momentum"]
        torch._fused_sgd_(
            [param],
            [grad],
            [state["momentum_buffer"]] if momentum else [],
            weight_decay=group["weight_decay"],
            momentum=momentum,
            lr=group["lr"],
            dampening=0.0,
            nesterov=group["nesterov"],
            maximize=False,
            is_first_step=False,  # the buffer starts at zero: buf = 0 * m + g
            found_inf=(go == 0).to(torch.float32),
        )


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
        state_dtype: torch.dtype | None = None,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(
                f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}"
            )
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        super().__init__(
            head,
            dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay),
            state_dtype,
        )

    _MOMENTS = ("exp_avg", "exp_avg_sq")

    def _init_state(self, param: torch.Tensor, state: dict) -> None:
        state["exp_avg"] = self._new_state(param)
        state["exp_avg_sq"] = self._new_state(param)
        state["row_step"] = torch.zeros(param.shape[0], dtype=param.dtype, device=param.device)

    def _update(self, param, grad, state, group, go) -> None:
        grad = self._gated(grad, go)
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
