"""Sampled steps' sparse weight gradients, and low-precision optimizer state.

* The gradient of a sampled step is a COO tensor over the sampled rows only, equal to
  the dense gradient restricted to them.
* Accumulated (uncoalesced, duplicated) gradients read by :func:`row_gradients` equal
  ``coalesce()``; optimizer steps on them equal steps on the coalesced gradient.
* bf16 momentum / Adam moments track fp32 state over 200 steps of the demo head.
"""

from __future__ import annotations

import pytest
import torch

from partial_fc import ArcFace, PartialFC
from partial_fc.optim import PartialFCAdamW, PartialFCSGD
from partial_fc.sparse_grad import grad_square_norm, row_gradients
from tests.dispatch_count import DispatchCounter
from tests.tolerances import gamma

pytestmark = pytest.mark.on_device

DIM = 8


def test_sampled_gradient_is_the_dense_gradient_on_the_sampled_rows(device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, DIM, generator=g, dtype=torch.float64).to(device)
    y = torch.randint(0, 50, (6,), generator=g).to(device)
    sampled = PartialFC(50, DIM, ArcFace(), 2, sample_rate=0.3, dtype=torch.float64, device=device)
    sampled(x, y).backward()
    grad = sampled.weight.grad
    assert grad.layout == torch.sparse_coo and grad.is_coalesced()
    rows = (sampled.last_sampled[:, None] * 2 + torch.arange(2, device=device)).reshape(-1)
    assert torch.equal(grad._indices()[0], rows)
    # Reference: the same classes through the dense path (a head over those rows only).
    reference = PartialFC(
        rows.numel() // 2, DIM, ArcFace(), 2, dtype=torch.float64, device=device
    )  # fmt: skip
    with torch.no_grad():
        reference.weight.copy_(sampled.weight[rows])
    remap = torch.full((50,), -1, dtype=torch.int64, device=device)
    remap[sampled.last_sampled] = torch.arange(sampled.last_sampled.numel(), device=device)
    reference(x, remap[y]).backward()
    # float64, the same classes in another layout: an entry sums the 6 rows' terms
    # s (p - y) d cos / d w, each within gamma_n of itself, n = the sampled logits
    # + a cosine's 2 DIM + 6 roundings; bounded via 6 x the largest entry.
    n = 2 * rows.numel() + 2 * DIM + 6
    atol = 6 * gamma(6 + n) * float(reference.weight.grad.abs().max())
    torch.testing.assert_close(grad._values(), reference.weight.grad, rtol=0, atol=atol)


def _uncoalesced(device: torch.device) -> torch.Tensor:
    """Three micro-steps' row lists concatenated, as accumulation on a GPU stores them."""
    g = torch.Generator().manual_seed(1)
    rows = torch.tensor([3, 7, 9, 1, 7, 12, 9, 3, 4], device=device)
    values = torch.randn(rows.numel(), DIM, generator=g, dtype=torch.float64).to(device)
    return torch.sparse_coo_tensor(rows[None], values, (16, DIM))


def test_row_gradients_merge_duplicates_like_coalesce(device: torch.device) -> None:
    grad = _uncoalesced(device)
    assert not grad.is_coalesced()
    with DispatchCounter() as counter:
        rows, totals, first = row_gradients(grad)
        square = grad_square_norm(grad)
    assert counter.host_syncs == []  # no data-dependent shape, unlike coalesce()
    merged = grad.coalesce()
    by_row = dict(zip(merged._indices()[0].tolist(), merged._values(), strict=True))
    assert sorted(rows[first].tolist()) == sorted(by_row)
    for row, total in zip(rows.tolist(), totals, strict=True):
        torch.testing.assert_close(total, by_row[row], rtol=0, atol=0)
    torch.testing.assert_close(square, merged._values().pow(2).sum().float())


@pytest.mark.parametrize("optimizer", [PartialFCSGD, PartialFCAdamW])
def test_steps_on_duplicated_rows_equal_steps_on_merged_rows(
    optimizer: type, device: torch.device
) -> None:
    heads = [PartialFC(16, DIM, ArcFace(), dtype=torch.float64, device=device) for _ in "ab"]
    opts = [optimizer(head, lr=0.1, weight_decay=0.01) for head in heads]
    for _ in range(3):
        grad = _uncoalesced(device)
        heads[0].weight.grad = grad
        heads[1].weight.grad = grad.coalesce()
        for opt in opts:
            opt.step()
    torch.testing.assert_close(heads[0].weight, heads[1].weight, rtol=0, atol=0)
    for name, value in opts[0].state[heads[0].weight].items():
        torch.testing.assert_close(value, opts[1].state[heads[1].weight][name], rtol=0, atol=0)
    untouched = torch.tensor([0, 2, 5, 6, 8, 10, 11, 13, 14, 15], device=device)
    fresh = PartialFC(16, DIM, ArcFace(), dtype=torch.float64, device=device)
    assert torch.equal(heads[0].weight[untouched], fresh.weight[untouched])


def _demo_head_run(state_dtype: torch.dtype | None, name: str) -> dict:
    """200 steps of the demo's head (400 classes, D 512, ArcFace s=32 m=0.3; here with
    Partial FC 0.5) on separable synthetic embeddings: initial and final weights, losses."""
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(400, 512, generator=g)
    head = PartialFC(400, 512, ArcFace(32.0, 0.3), sample_rate=0.5, seed=1)
    initial = head.weight.detach().clone()
    opt = (
        PartialFCSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4, state_dtype=state_dtype)
        if name == "sgd"
        else PartialFCAdamW(head, lr=1e-3, weight_decay=0.01, state_dtype=state_dtype)
    )
    losses = []
    for _ in range(200):
        y = torch.randint(0, 400, (64,), generator=g)
        x = centres[y] + 2.0 * torch.randn(64, 512, generator=g)  # overlapping classes
        opt.zero_grad()
        loss = head(x, y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    moments = [v for v in opt.state[head.weight].values() if v.dim() == 2]
    return {"initial": initial, "final": head.weight.detach(), "losses": losses,
            "moment_dtypes": {v.dtype for v in moments}}  # fmt: skip


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_bf16_state_tracks_fp32_state_over_200_demo_steps(name: str) -> None:
    fp32, bf16 = _demo_head_run(None, name), _demo_head_run(torch.bfloat16, name)
    assert fp32["moment_dtypes"] == {torch.float32} and bf16["moment_dtypes"] == {torch.bfloat16}
    # How far bf16 state moves the weights, relative to how far training moved them.
    travelled = (fp32["final"] - fp32["initial"]).norm()
    drift = float((bf16["final"] - fp32["final"]).norm() / travelled)
    late32, late16 = sum(fp32["losses"][-20:]), sum(bf16["losses"][-20:])
    print(f"{name}: weight drift {drift:.4f} of the distance travelled; "
          f"late loss fp32 {late32 / 20:.4f} bf16 {late16 / 20:.4f}")  # fmt: skip
    assert drift < 0.02, drift
    assert abs(late16 - late32) / late32 < 0.02
    assert fp32["losses"][-1] < 0.5 * fp32["losses"][0]  # it really trained
