"""Inputs every loss refuses or defines: labels must be integers, and a batch with no
usable sample on any rank gives a zero loss with zero gradients."""

from __future__ import annotations

import pytest
import torch

from partial_fc import ArcFace, PartialFC, ShardedCenterLoss, TripletLoss
from tests.distributed import device_under_test, run_ranks

pytestmark = pytest.mark.on_device

CLASSES, DIM, BATCH = 12, 6, 4


def _losses(device: torch.device) -> dict[str, torch.nn.Module]:
    """Each loss that takes (embeddings, labels), with -1 marking an ignored sample."""
    return {
        "head": PartialFC(CLASSES, DIM, ArcFace(), ignore_index=-1, device=device),
        "head_sampled": PartialFC(
            CLASSES, DIM, ArcFace(), sample_rate=0.5, ignore_index=-1, device=device
        ),
        "center": ShardedCenterLoss(CLASSES, DIM, learnable=True, device=device),
        "triplet": TripletLoss(0.3, "batch_hard"),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_labels_must_be_integers(dtype: torch.dtype, device: torch.device) -> None:
    labels = torch.tensor([1.5, 2.0, float("nan"), 0.0]).to(device=device, dtype=dtype)
    for loss in _losses(device).values():
        with pytest.raises(TypeError, match=f"integer tensor of class ids, got dtype {dtype}"):
            loss(torch.randn(BATCH, DIM, device=device), labels)


def _all_ignored(rank: int, world: int, batch: int) -> dict[str, tuple[float, float, float]]:
    """Every loss on ``batch`` samples per rank, all labelled -1 (ignored / unknown)."""
    device = device_under_test()
    out = {}
    for name, loss in _losses(device).items():
        x = torch.randn(batch, DIM, device=device, requires_grad=True)
        value = loss(x, torch.full((batch,), -1, device=device))
        value.backward()
        params = [p.grad for p in loss.parameters() if p.grad is not None]
        param_grad = sum(float(g.abs().sum()) for g in params)
        out[name] = (float(value), float(x.grad.abs().sum()), param_grad)
    return out


@pytest.mark.parametrize("batch", [BATCH, 0])  # all ignored; no sample at all
@pytest.mark.parametrize("world", [1, 2])
def test_a_batch_with_no_usable_sample_gives_zero_loss_and_gradients(
    world: int, batch: int
) -> None:
    for per_loss in run_ranks(_all_ignored, world, batch):
        assert per_loss.keys() == {"head", "head_sampled", "center", "triplet"}
        for name, (value, x_grad, param_grad) in per_loss.items():
            assert (value, x_grad, param_grad) == (0.0, 0.0, 0.0), name
