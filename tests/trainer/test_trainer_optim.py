"""The trainer's torch optimizers: fused, skipped on the device, resumable from any state."""

from __future__ import annotations

import copy

import pytest
import torch

from configs import OptimizerConfig
from partial_fc import ArcFace, PartialFC
from partial_fc.sparse_grad import grad_values
from tests.tolerances import gamma
from trainer.optim import (
    build_backbone_optimizer,
    build_head_optimizer,
    load_optimizer_state,
    step_unless,
)

pytestmark = pytest.mark.on_device


def _params(device: torch.device) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(5, 3, generator=g).to(device)) for _ in range(2)]


def _set_grads(params: list[torch.nn.Parameter], seed: int, bad: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.device)
        if bad:
            p.grad[0, 0] = float("nan")


def _config(name: str) -> OptimizerConfig:
    return OptimizerConfig(name=name, lr=0.1, momentum=0.9, weight_decay=0.01)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_skipped_steps_change_nothing_and_others_match_torch(
    name: str, device: torch.device
) -> None:
    ours, reference = _params(device), _params(device)
    opt = build_backbone_optimizer(_config(name), ours)
    cfg = _config(name)
    ref = (
        torch.optim.SGD(reference, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        if name == "sgd"
        else torch.optim.AdamW(reference, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                               weight_decay=cfg.weight_decay)
    )  # fmt: skip
    # A skipped first step (NaN gradient) leaves parameters and state as they were ...
    before = [p.detach().clone() for p in ours]
    _set_grads(ours, 0, bad=True)
    step_unless(opt, torch.tensor(True, device=device))
    for p, b in zip(ours, before, strict=True):
        assert torch.equal(p, b)
    # ... so the following steps equal torch's reference optimizer that never saw it.
    for seed in (1, 2, 3):
        _set_grads(ours, seed)
        _set_grads(reference, seed)
        step_unless(opt, torch.tensor(False, device=device))
        ref.step()
    # fp32, the same formulas (fused or per-tensor): 3 steps of <= 12 roundings per entry
    # each (decay, moments, bias corrections, sqrt, divide, update), relative to the
    # entry and to the 3 updates of size <= 3 lr (|m / sqrt(v)| <= 3 for t <= 3).
    n = 12 * 3
    for p, r in zip(ours, reference, strict=True):
        torch.testing.assert_close(
            p, r, rtol=gamma(n, torch.float32), atol=gamma(n, torch.float32) * 3 * 3 * 0.1
        )


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_head_optimizer_skip_is_bit_identical(name: str, device: torch.device) -> None:
    head = PartialFC(40, 4, ArcFace(), sample_rate=0.5, device=device)
    opt = build_head_optimizer(_config(name), head)
    for skip in (False, True):
        opt.zero_grad()
        head(torch.randn(6, 4, device=device), torch.arange(6, device=device)).backward()
        if skip:
            grad_values(head.weight.grad)[0, 0] = float("inf")
        weight = head.weight.detach().clone()
        state = {k: v.clone() for k, v in opt.state[head.weight].items()}
        step_unless(opt, torch.tensor(skip, device=device))
        assert torch.equal(head.weight, weight) == skip
        for k, v in state.items():
            assert torch.equal(opt.state[head.weight][k], v) == skip


def test_state_of_a_non_fused_optimizer_resumes_fused() -> None:
    """Checkpoints written before the optimizers were fused still resume."""
    old, new = _params(torch.device("cpu")), _params(torch.device("cpu"))
    legacy = torch.optim.SGD(old, lr=0.3, momentum=0.9)
    _set_grads(old, 0)
    legacy.step()
    opt = build_backbone_optimizer(_config("sgd"), new)
    # As read from a checkpoint: a copy (load_state_dict would share the buffers).
    load_optimizer_state(opt, copy.deepcopy(legacy.state_dict()))
    assert all(group["fused"] for group in opt.param_groups)
    assert opt.param_groups[0]["lr"] == 0.3  # hyperparameters come from the checkpoint
    with torch.no_grad():
        for p, q in zip(new, old, strict=True):
            p.copy_(q)
    _set_grads(old, 1)
    _set_grads(new, 1)
    legacy.step()
    step_unless(opt, torch.tensor(False))
    for p, q in zip(new, old, strict=True):
        torch.testing.assert_close(p, q)


def test_step_unless_refuses_an_optimizer_that_cannot_skip_on_the_device() -> None:
    opt = torch.optim.SGD(_params(torch.device("cpu")), lr=0.1)
    with pytest.raises(ValueError, match="fused"):
        step_unless(opt, torch.tensor(False))


def test_head_state_dtype_reaches_the_head_optimizer(device: torch.device) -> None:
    from configs import ConfigError, load_config

    cfg = load_config("demo", ["optimizer.head_state_dtype=bf16", "head.sample_rate=0.5"])
    head = PartialFC(40, 4, ArcFace(), sample_rate=0.5, device=device)
    opt = build_head_optimizer(cfg.optimizer, head)
    head(torch.randn(6, 4, device=device), torch.arange(6, device=device)).backward()
    opt.step()
    assert opt.state[head.weight]["momentum_buffer"].dtype == torch.bfloat16
    with pytest.raises(ConfigError, match=r"optimizer\.head_state_dtype"):
        load_config("demo", ["optimizer.head_state_dtype=fp16"])
