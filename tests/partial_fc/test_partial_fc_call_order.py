"""Every call order PyTorch users write trains a sampled head: the optimizers update
the rows the backward passes gave a gradient to, whenever ``zero_grad`` was called."""

from __future__ import annotations

import pytest
import torch

from partial_fc import ArcFace, PartialFC
from partial_fc.optim import PartialFCAdamW, PartialFCSGD
from tests.distributed import device_under_test, run_ranks

pytestmark = pytest.mark.on_device

NUM_CLASSES, DIM, LOCAL_BATCH, RATE = 60, 8, 4, 0.2
OPTIMIZERS = {"sgd": PartialFCSGD, "adamw": PartialFCAdamW}


def _train(rank: int, world: int, name: str, order: str) -> dict[str, torch.Tensor]:
    """Two steps in ``order``; the head's weight shard and the rows each step sampled."""
    device = device_under_test()
    head = PartialFC(NUM_CLASSES, DIM, ArcFace(), sample_rate=RATE, seed=3, device=device)
    opt = OPTIMIZERS[name](head, lr=0.5)
    start = head.weight.detach().clone()
    g = torch.Generator().manual_seed(11)
    sampled = []
    for _ in range(2):
        x = torch.randn(world * LOCAL_BATCH, DIM, generator=g)
        y = torch.randint(0, NUM_CLASSES, (world * LOCAL_BATCH,), generator=g)
        mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        x, y = x[mine].to(device), y[mine].to(device)
        if order == "zero_grad first":
            opt.zero_grad()
            loss = head(x, y)
        else:  # the README's order: forward, zero_grad, backward, step
            loss = head(x, y)
            opt.zero_grad()
        loss.backward()
        opt.step()
        sampled.append(head.last_sampled.cpu())
    return {"start": start.cpu(), "weight": head.weight.detach().cpu(), "sampled": sampled}


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_both_zero_grad_orders_train_the_sampled_rows(world: int, name: str) -> None:
    first = run_ranks(_train, world, name, "zero_grad first")
    readme = run_ranks(_train, world, name, "forward first")
    for a, b in zip(first, readme, strict=True):
        torch.testing.assert_close(a["weight"], b["weight"], rtol=0, atol=0)
        used = torch.zeros(a["weight"].shape[0], dtype=torch.bool)
        for rows in a["sampled"]:
            assert rows.numel() < a["weight"].shape[0]  # a real sample, not every class
            used[rows] = True
        moved = (a["weight"] != a["start"]).any(dim=1)
        assert torch.equal(moved, used)
