"""Partial-FC sampling and the row-sparse head optimizers: unsampled centres and
their optimizer state stay bit-identical; with every class used the updates
equal torch's dense SGD and AdamW."""

from __future__ import annotations

import pytest
import torch

from partial_fc import ArcFace, PartialFC
from partial_fc.optim import PartialFCAdamW, PartialFCSGD
from partial_fc.sampling import num_sampled_classes
from partial_fc.softmax_ce import chunk_bounds
from tests.distributed import device_under_test
from tests.tolerances import gamma

pytestmark = pytest.mark.on_device  # `pytest --device cuda` reruns these on the GPU

NUM_CLASSES, DIM = 200, 16

OPTIMIZERS = {
    "sgd": (
        lambda head: PartialFCSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4),
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4),
    ),
    "adamw": (
        lambda head: PartialFCAdamW(head, lr=0.01, weight_decay=0.05),
        lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.05),
    ),
}


def _batch(step: int, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    device = device_under_test()
    return torch.randn(batch, DIM, generator=g).to(device), torch.randint(
        0, NUM_CLASSES, (batch,), generator=g
    ).to(device)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("num_subcenters", [1, 3])
def test_unsampled_rows_and_their_state_are_untouched(
    name: str, num_subcenters: int, device: torch.device
) -> None:
    head = PartialFC(NUM_CLASSES, DIM, ArcFace(), num_subcenters, sample_rate=0.1, device=device)
    optimizer = OPTIMIZERS[name][0](head)
    for step in range(4):
        before = head.weight.detach().clone()
        state_before = {k: v.clone() for k, v in optimizer.state[head.weight].items()}
        optimizer.zero_grad()
        x, y = _batch(step)
        head(x, y).backward()
        sampled = head.last_sampled
        positives = set(y.tolist())
        assert sampled.numel() == num_sampled_classes(NUM_CLASSES, 0.1, len(y)) == 20
        assert positives <= set(sampled.tolist())
        optimizer.step()

        used = torch.zeros(NUM_CLASSES, dtype=torch.bool, device=device)
        used[sampled] = True
        used_rows = used.repeat_interleave(num_subcenters)
        assert torch.equal(head.weight[~used_rows], before[~used_rows])
        assert not torch.equal(head.weight[used_rows], before[used_rows])
        for key, value in optimizer.state[head.weight].items():
            # Unused rows keep their state bit for bit (zeros before any step).
            previous = state_before.get(key, torch.zeros_like(value))
            assert torch.equal(value[~used_rows], previous[~used_rows]), key


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("num_subcenters", [1, 2])
@pytest.mark.parametrize("row_block", [None, 3])  # 3: the CPU's blocked update, many blocks
def test_sampled_steps_equal_one_torch_optimizer_per_row(
    name: str,
    num_subcenters: int,
    row_block: int | None,
    device: torch.device,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reference: every row its own torch optimizer, stepped only when the row took
    part. A row first used at step t gets a first step (AdamW's per-row bias
    correction), its state is untouched in between, and the values match exactly."""
    if row_block is not None:
        monkeypatch.setattr("partial_fc.optim._CPU_ROW_BLOCK", row_block)
    head = PartialFC(
        40, DIM, ArcFace(), num_subcenters, sample_rate=0.25, dtype=torch.float64, device=device
    )
    optimizer = OPTIMIZERS[name][0](head)
    rows = [torch.nn.Parameter(r.detach().clone()) for r in head.weight]
    reference = [OPTIMIZERS[name][1]([row]) for row in rows]
    first_use = {}
    for step in range(6):
        optimizer.zero_grad()
        x, y = _batch(step, batch=4)
        head(x.double(), y % 40).backward()
        used = (head.last_sampled[:, None] * num_subcenters + torch.arange(num_subcenters,
                device=device)).reshape(-1).tolist()  # fmt: skip
        optimizer.step()
        for r in used:
            first_use.setdefault(r, step)
            rows[r].grad = head.weight.grad[r].clone()
            reference[r].step()
        # Same gradients; an SGD/AdamW step rounds <= 12 times per entry (decay, moments,
        # bias corrections, sqrt, divide, update), so after step + 1 steps the entries
        # differ by <= gamma_{12 (step + 1)} of the largest weight.
        atol = gamma(12 * (step + 1)) * float(head.weight.detach().abs().max())
        torch.testing.assert_close(head.weight.detach(), torch.stack(rows).detach(),
                                   rtol=0, atol=atol)  # fmt: skip
    # The optimizer state too: each used row's moments equal its reference's, the
    # others are still zero.
    state = optimizer.state[head.weight]
    for name in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
        if name not in state:
            continue
        expected = torch.stack([
            reference[r].state[rows[r]][name] if r in first_use else torch.zeros_like(rows[r])
            for r in range(len(rows))
        ])  # fmt: skip
        # 6 steps of <= 12 roundings each, relative to the largest moment
        atol = gamma(12 * 6) * float(expected.abs().max())
        torch.testing.assert_close(state[name], expected, rtol=0, atol=atol)
    # The sample really varied: some rows joined late, some never.
    assert len(set(first_use.values())) > 2 and len(first_use) < head.weight.shape[0]


def test_accumulated_micro_steps_update_the_union_of_their_classes(device: torch.device) -> None:
    head = PartialFC(NUM_CLASSES, DIM, ArcFace(), sample_rate=0.05, device=device)
    optimizer = PartialFCSGD(head, lr=0.1)
    before = head.weight.detach().clone()
    optimizer.zero_grad()
    used = torch.zeros(NUM_CLASSES, dtype=torch.bool, device=device)
    for micro in range(3):
        x, y = _batch(micro)
        (head(x, y) / 3).backward()
        used[head.last_sampled] = True
    optimizer.step()
    changed = (head.weight != before).any(dim=1)
    assert torch.equal(changed, used)
    assert head.weight.grad.layout == torch.sparse_coo  # sampled: only the rows in use


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_dense_steps_equal_torch_optimizers(name: str, device: torch.device) -> None:
    # float64: Adam divides by sqrt(v), which magnifies fp32 rounding of near-zero gradients.
    ours = PartialFC(50, DIM, ArcFace(), dtype=torch.float64, device=device)
    theirs = PartialFC(50, DIM, ArcFace(), dtype=torch.float64, device=device)
    make_ours, make_theirs = OPTIMIZERS[name]
    opt_ours, opt_theirs = make_ours(ours), make_theirs(theirs.parameters())
    for step in range(5):
        x, y = _batch(step)
        x, y = x.double(), y % 50
        for head, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            head(x, y).backward()
            opt.step()
    # Same gradients (same head code); 5 steps of <= 12 roundings per entry each. AdamW's
    # bias corrections 1 - beta^t cancel (condition 1 / (1 - beta2) = 1000, + 10 for
    # beta1) on an update lr * |m / sqrt(v)| <= 3 lr for t <= 5 (Cauchy-Schwarz).
    atol = gamma(12 * 5) * float(theirs.weight.detach().abs().max())
    if name == "adamw":
        atol += 5 * 3 * 0.01 * gamma(1000 + 10 + 12)
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=0, atol=atol)


def test_sampling_is_seeded_and_reproducible(device: torch.device) -> None:
    def draws(seed: int) -> list[list[int]]:
        head = PartialFC(NUM_CLASSES, DIM, ArcFace(), sample_rate=0.2, seed=seed, device=device)
        out = []
        for step in range(3):
            x, y = _batch(step)
            head(x, y).backward()
            out.append(head.last_sampled.tolist())
        return out

    torch.manual_seed(1)
    first = draws(7)
    torch.manual_seed(2)  # the global RNG plays no part
    assert draws(7) == first
    assert draws(8) != first
    assert first[0] != first[1]  # a fresh draw every step


def test_sampling_resumes_from_state_dict(device: torch.device) -> None:
    head = PartialFC(NUM_CLASSES, DIM, ArcFace(), sample_rate=0.2, seed=5, device=device)
    for step in range(2):
        head(*_batch(step)).backward()
    resumed = PartialFC(NUM_CLASSES, DIM, ArcFace(), sample_rate=0.2, seed=5, device=device)
    resumed.load_state_dict(head.state_dict())
    assert resumed.num_steps == 2
    head(*_batch(2)).backward()
    resumed(*_batch(2)).backward()
    assert torch.equal(head.last_sampled, resumed.last_sampled)


def test_evaluation_uses_every_class(device: torch.device) -> None:
    head = PartialFC(NUM_CLASSES, DIM, ArcFace(), sample_rate=0.1, device=device).eval()
    with torch.no_grad():
        head(*_batch(0))
    assert head.last_sampled is None and head.num_steps == 0


def test_more_positives_than_the_sample_size_keeps_them_all(device: torch.device) -> None:
    head = PartialFC(20, DIM, ArcFace(), sample_rate=0.1, device=device)
    x = torch.randn(12, DIM).to(device)
    y = torch.arange(12, device=device)
    head(x, y).backward()
    assert head.last_sampled.tolist() == list(range(12))


def test_chunked_and_unchunked_agree_in_fp32(device: torch.device) -> None:
    torch.manual_seed(0)
    x = torch.randn(32, DIM).to(device)
    y = torch.randint(0, 1000, (32,)).to(device)
    results = []
    for chunk in (1000, 97, 7):
        head = PartialFC(1000, DIM, ArcFace(), num_subcenters=2, chunk_classes=chunk, device=device)
        xi = x.clone().requires_grad_(True)
        loss = head(xi, y)
        loss.backward()
        results.append((loss.detach(), xi.grad, head.weight.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            # atol 2e-6: the weight-gradient projection w <w, A> / |w|^2 cancels against A
            # (terms ~30x the result), and a batched row product sums in a shape-dependent order.
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("chunk", [None, 300, 1000])
def test_second_backward_with_retained_graph_matches_the_first(
    chunk: int | None, device: torch.device
) -> None:
    torch.manual_seed(0)
    head = PartialFC(1000, DIM, ArcFace(), chunk_classes=chunk, device=device)
    x = torch.randn(16, DIM).to(device).requires_grad_(True)
    loss = head(x, torch.randint(0, 1000, (16,)).to(device))
    loss.backward(retain_graph=True)
    first = (x.grad.clone(), head.weight.grad.clone())
    loss.backward()  # the kept block is gone: this one recomputes every chunk
    # The same operations on the same data: on the CPU the second gradient equals the
    # first and first + first = 2 * first exactly; CUDA's atomic adds may reorder sums
    # (left at torch's default fp32 tolerance there).
    exact = dict(rtol=0, atol=0) if device.type == "cpu" else {}
    torch.testing.assert_close(x.grad, 2 * first[0], **exact)
    torch.testing.assert_close(head.weight.grad, 2 * first[1], **exact)


def test_skipped_rows_whose_entries_are_all_filtered_give_finite_gradients(
    device: torch.device,
) -> None:
    # Padding-like rows (zero embeddings have cosine 0 everywhere) filtered with a
    # negative threshold: every entry of the ignored row is removed.
    head = PartialFC(
        50, DIM, ArcFace(), ignore_index=-1, interclass_filtering_threshold=-0.5, device=device
    )
    x = torch.randn(4, DIM).to(device)
    x[1] = 0.0
    x.requires_grad_(True)
    loss = head(x, torch.tensor([3, -1, 7, 9], device=device))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()
    assert x.grad[1].abs().sum() == 0


@pytest.mark.parametrize(
    "num_used,chunk", [(0, 4), (1, 4), (7, 2), (6, 2), (10, 3), (5, 9), (4096, 4096)]
)
def test_chunk_bounds_cover_every_class_once_with_the_remainder_first(
    num_used: int, chunk: int
) -> None:
    bounds = chunk_bounds(num_used, chunk)
    covered = [c for start, stop in bounds for c in range(start, stop)]
    assert covered == list(range(num_used))
    assert all(0 < stop - start <= chunk for start, stop in bounds)
    # Only the first chunk may be short: the last one, reused by the backward, is full.
    assert all(stop - start == min(chunk, num_used) for start, stop in bounds[1:])
    if bounds:
        assert bounds[-1][1] - bounds[-1][0] == min(chunk, num_used)


def test_automatic_chunk_keeps_the_block_within_40_percent_of_the_gradient() -> None:
    head = PartialFC(100_000, 512, ArcFace())
    # B * chunk <= 0.4 * C * D: 80,000 of 100,000 classes at B = 256, D = 512.
    assert head._auto_chunk(256, 100_000) == 80_000
    assert head._auto_chunk(256, 10_000) == 10_000  # sampled: everything fits
    assert head._auto_chunk(4096, 100_000) == 5_000
    assert head._auto_chunk(1 << 20, 100_000) == 4096  # never below 4096 classes
