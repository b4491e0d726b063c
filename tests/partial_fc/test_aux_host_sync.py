"""The auxiliary losses make the host wait for the device nowhere in a training
step (forward and backward), and their work does not depend on the data.

On CPU nothing waits, so :class:`tests.dispatch_count.DispatchCounter` records the
operators that *would* synchronise on CUDA (value reads, data-dependent shapes,
boolean-mask indexing, device-to-host copies). Two batches of the same shape but
different label structure (numbers of known samples, positive pairs, owned rows)
must dispatch the same number of operators: the shapes and the work follow from
the batch size alone. Single process, ``max_local_batch`` equal to the batch, so
the gather exchanges no sizes.
"""

from __future__ import annotations

import pytest
import torch

from partial_fc.center_loss import ShardedCenterLoss
from partial_fc.triplet import TripletLoss
from tests.dispatch_count import DispatchCounter

B, D, C = 16, 6, 5


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three ``(B, D)`` / ``(B,)`` batches of the same shape, different label structure:
    many positive pairs with unknown samples, only distinct labels (no positive pair),
    and no known sample at all."""
    g = torch.Generator().manual_seed(0)
    many = torch.arange(B) % 2
    many[::5] = -1
    distinct = torch.tensor([c if c < C else -1 for c in range(B)])
    unknown = torch.full((B,), -1)
    return [(torch.randn(B, D, generator=g), labels) for labels in (many, distinct, unknown)]


def _count(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> DispatchCounter:
    """Forward and backward of ``module`` on a fresh leaf copy of ``x``, counted."""
    x = x.clone().requires_grad_(True)
    with DispatchCounter() as counter:
        loss = module(x, y)
        loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    return counter


def _assert_no_sync_and_static(make_module) -> None:
    counts = []
    for x, y in _batches():
        counter = _count(make_module(), x, y)
        assert counter.host_syncs == [], counter.host_syncs
        assert counter.total > 0
        counts.append(counter.total)
    assert len(set(counts)) == 1, f"operator count depends on the labels: {counts}"


@pytest.mark.parametrize("distance", ["squared_euclidean", "euclidean", "cosine"])
@pytest.mark.parametrize("learnable", [True, False])
def test_center_loss_no_host_sync(distance: str, learnable: bool) -> None:
    """Label validation (``torch._assert_async``) included."""
    _assert_no_sync_and_static(
        lambda: ShardedCenterLoss(
            C, D, radius=0.1, learnable=learnable, distance=distance, max_local_batch=B
        )
    )


@pytest.mark.parametrize("distance", ["squared_euclidean", "cosine"])
@pytest.mark.parametrize("mining", ["batch_all", "batch_hard", "semi_hard"])
def test_triplet_loss_no_host_sync(mining: str, distance: str) -> None:
    _assert_no_sync_and_static(lambda: TripletLoss(0.3, mining, distance, max_local_batch=B))


def test_counter_sees_the_removed_patterns() -> None:
    """The check can fail: the constructs the losses no longer use are recorded."""
    x, y = _batches()[0]
    with DispatchCounter() as counter:
        (y >= 0).nonzero()
        x[y >= 0].sum()
        bool((y >= C).any())
    assert len(counter.host_syncs) == 3, counter.host_syncs


def test_center_loss_rank_without_classes_no_host_sync() -> None:
    """A rank that owns no classes (``num_local == 0``, here a single process made to
    look like one) computes a zero partial on zero rows, still without a sync."""
    module = ShardedCenterLoss(C, D, max_local_batch=B)
    module.class_start, module.num_local = C, 0
    module.centers = torch.nn.Parameter(module.centers.detach()[:0].clone())
    for x, y in _batches():
        counter = _count(module, x, y)
        assert counter.host_syncs == [], counter.host_syncs
        assert module.centers.grad is not None and module.centers.grad.shape == (0, D)
    loss = module(x.requires_grad_(True), torch.arange(B) % C)
    assert loss.item() == 0.0 and loss.requires_grad
