"""The sharded center loss and the gathered triplet loss equal plain single-process
references written here (float64, Python loops over samples and triplets): loss,
gradients to every rank's embeddings and to every centre shard, on 1 to 4 gloo
ranks with ragged batches (including an empty rank), unknown labels, padding."""

from __future__ import annotations

import math

import pytest
import torch

from partial_fc.center_loss import ShardedCenterLoss
from partial_fc.sharding import class_range
from partial_fc.triplet import TripletLoss
from tests.distributed import run_ranks
from tests.tolerances import gamma

D = 5
BATCH_SIZES = {1: [11], 2: [7, 4], 3: [5, 0, 6], 4: [3, 4, 1, 5]}
# float64 both sides, different orders and partitions. A distance carries 2 D + 6
# roundings (squared differences or dot and norms) relative to the squared scale S of the
# vectors; a loss sums at most B^3 triplets (B^2 per anchor) or B centre terms. Each term
# (d_ap - d_an + margin, d - radius) is within 2 S gamma_{2D+6}, the sum of n of them
# within gamma_n of n * 2 S, so the mean is within 2 S gamma_{n + 2D + 6}.
N_MAX = 16**3 + 2 * D + 6


def _scale(*vectors: torch.Tensor) -> float:
    """S: the largest squared norm among the rows, times 4 (a squared difference)."""
    return max(2.0, 4 * max(float(v.detach().pow(2).sum(1).max()) for v in vectors))


# ------------------------------------------------------------------ references


def ref_distance(x: torch.Tensor, y: torch.Tensor, distance: str) -> torch.Tensor:
    """Distance between two vectors, written out."""
    if distance == "squared_euclidean":
        return sum((x[i] - y[i]) ** 2 for i in range(x.shape[0]))
    if distance == "euclidean":
        return torch.sqrt(sum((x[i] - y[i]) ** 2 for i in range(x.shape[0])))
    cos = torch.dot(x, y) / (torch.sqrt(torch.dot(x, x)) * torch.sqrt(torch.dot(y, y)))
    return 1.0 - cos


def ref_center_loss(emb, centers, labels, radius, distance):
    terms = [
        torch.relu(ref_distance(emb[i], centers[int(labels[i])], distance) - radius)
        for i in range(emb.shape[0])
        if labels[i] >= 0
    ]
    if not terms:
        return (emb * 0).sum() + (centers * 0).sum()
    return sum(terms) / len(terms)


def ref_triplet_loss(emb, labels, margin, mining, distance):
    n = emb.shape[0]
    d = [[ref_distance(emb[i], emb[j], distance) for j in range(n)] for i in range(n)]
    dv = [[float(v.detach()) for v in row] for row in d]
    known = [int(v) >= 0 for v in labels]
    lab = [int(v) for v in labels]
    zero = (emb * 0).sum()
    terms = []
    for a in range(n):
        if not known[a]:
            continue
        pos = [p for p in range(n) if p != a and known[p] and lab[p] == lab[a]]
        neg = [q for q in range(n) if known[q] and lab[q] != lab[a]]
        if not neg or not pos:
            continue
        if mining == "batch_all":
            for p in pos:
                for q in neg:
                    terms.append(torch.relu(d[a][p] - d[a][q] + margin))
        elif mining == "batch_hard":
            p = max(pos, key=lambda j: (dv[a][j], -j))
            q = min(neg, key=lambda j: (dv[a][j], j))
            terms.append(torch.relu(d[a][p] - d[a][q] + margin))
        else:
            for p in pos:
                farther = [q for q in neg if dv[a][q] > dv[a][p]]
                if farther:
                    q = min(farther, key=lambda j: (dv[a][j], j))
                else:
                    q = max(neg, key=lambda j: (dv[a][j], -j))
                terms.append(torch.relu(d[a][p] - d[a][q] + margin))
    if mining == "batch_all":
        active = [t for t in terms if float(t.detach()) > 0]
        return (sum(active) + zero) / max(len(active), 1)
    return (sum(terms) + zero) / max(len(terms), 1)


# ------------------------------------------------------------------ case data


def _batch(seed: int, world_size: int, num_classes: int, unknown: str = "some"):
    g = torch.Generator().manual_seed(seed)
    batch = sum(BATCH_SIZES[world_size])
    labels = torch.randint(0, num_classes, (batch,), generator=g)
    if unknown == "some":
        labels[torch.arange(batch) % 4 == 1] = -1
    elif unknown == "all":
        labels[:] = -3
    embeddings = torch.randn(batch, D, generator=g, dtype=torch.float64)
    centers = torch.randn(num_classes, D, generator=g, dtype=torch.float64)
    return embeddings, labels, centers


def _center_cases() -> list[dict]:
    cases = []
    seed = 100
    for num_classes in (D, 7, 3):  # identity init, normal init, fewer classes than ranks
        for distance in ("squared_euclidean", "euclidean", "cosine"):
            for radius in (0.0, 0.7):
                seed += 1
                cases.append(dict(seed=seed, C=num_classes, distance=distance, radius=radius))
    cases.append(dict(seed=1, C=7, distance="squared_euclidean", radius=0.0, learnable=False))
    cases.append(dict(seed=2, C=7, distance="squared_euclidean", radius=0.3, unknown="all"))
    cases.append(dict(seed=3, C=7, distance="cosine", radius=0.1, padded=True))
    return cases


def _triplet_cases() -> list[dict]:
    cases = []
    seed = 200
    for mining in ("batch_all", "batch_hard", "semi_hard"):
        for distance in ("squared_euclidean", "cosine"):
            for margin in (0.3, 4.0):
                seed += 1
                cases.append(dict(seed=seed, mining=mining, distance=distance, margin=margin))
        cases.append(dict(seed=seed, mining=mining, distance="cosine", margin=0.5, padded=True))
        cases.append(dict(seed=seed, mining=mining, distance="cosine", margin=0.5, unknown="all"))
    return cases


# ------------------------------------------------------------------ per-rank runs


def _local(tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    sizes = BATCH_SIZES[world_size]
    lo = sum(sizes[:rank])
    return tensor[lo : lo + sizes[rank]].clone()


def _run_center(rank: int, world_size: int, case: dict) -> dict:
    emb, labels, centers = _batch(case["seed"], world_size, case["C"], case.get("unknown", "some"))
    loss_fn = ShardedCenterLoss(
        case["C"],
        D,
        radius=case["radius"],
        learnable=case.get("learnable", True),
        distance=case["distance"],
        max_local_batch=max(BATCH_SIZES[world_size]) if case.get("padded") else None,
        dtype=torch.float64,
    )
    init = loss_fn.centers.detach().clone()
    with torch.no_grad():
        loss_fn.centers.copy_(
            centers[loss_fn.class_start : loss_fn.class_start + loss_fn.num_local]
        )
    local = _local(emb, rank, world_size).requires_grad_(True)
    loss = loss_fn(local, _local(labels, rank, world_size))
    loss.backward()
    grad_centers = loss_fn.centers.grad if case.get("learnable", True) else None
    return dict(
        loss=loss.detach(),
        grad_embeddings=local.grad,
        grad_centers=grad_centers,
        class_range=(loss_fn.class_start, loss_fn.num_local),
        init=init,
    )


def _run_triplet(rank: int, world_size: int, case: dict) -> dict:
    emb, labels, _ = _batch(case["seed"], world_size, 4, case.get("unknown", "some"))
    loss_fn = TripletLoss(
        case["margin"],
        case["mining"],
        case["distance"],
        max_local_batch=max(BATCH_SIZES[world_size]) if case.get("padded") else None,
    )
    local = _local(emb, rank, world_size).requires_grad_(True)
    loss = loss_fn(local, _local(labels, rank, world_size))
    loss.backward()
    return dict(loss=loss.detach(), grad_embeddings=local.grad)


def _run_all(rank: int, world_size: int) -> dict:
    torch.set_default_dtype(torch.float64)
    return dict(
        center=[_run_center(rank, world_size, c) for c in _center_cases()],
        triplet=[_run_triplet(rank, world_size, c) for c in _triplet_cases()],
    )


def _check_center(case: dict, world_size: int, per_rank: list[dict]) -> None:
    emb, labels, centers = _batch(case["seed"], world_size, case["C"], case.get("unknown", "some"))
    emb.requires_grad_(True)
    centers.requires_grad_(True)
    loss = ref_center_loss(emb, centers, labels, case["radius"], case["distance"])
    loss.backward()
    where = f"center {case} W={world_size}"
    sizes = BATCH_SIZES[world_size]
    scale = _scale(emb, centers)
    # Initial centres are independent of the world size.
    init = torch.cat([got["init"] for got in per_rank])
    single = ShardedCenterLoss(case["C"], D, dtype=torch.float64).centers.detach()
    torch.testing.assert_close(init, single, rtol=0, atol=0, msg=where)
    for rank, got in enumerate(per_rank):
        start, count = class_range(case["C"], rank, world_size)
        assert got["class_range"] == (start, count), where
        _assert_rank_matches(got, loss, emb, sizes, rank, where, scale)
        if case.get("learnable", True):
            # an entry sums <= B rows' terms: gamma_n of B x the largest entry
            atol = len(labels) * gamma(N_MAX) * float(centers.grad.abs().max())
            torch.testing.assert_close(
                got["grad_centers"], centers.grad[start : start + count], rtol=0, atol=atol,
                msg=f"centre grad rank {rank} {where}",
            )  # fmt: skip


def _assert_rank_matches(
    got: dict,
    loss: torch.Tensor,
    emb: torch.Tensor,
    sizes: list[int],
    rank: int,
    where: str,
    scale: float,
) -> None:
    """Rank ``rank``'s loss is the reference loss and its embedding gradient is the
    reference gradient of its own rows."""
    # the mean of <= N_MAX terms of size <= 2 S (see N_MAX)
    atol = 2 * scale * gamma(N_MAX)
    torch.testing.assert_close(got["loss"], loss.detach(), rtol=0, atol=atol, msg=where)
    lo = sum(sizes[:rank])
    # an entry sums a row's terms (<= B^2 triplets): gamma_n of B x the largest entry
    atol = len(emb) * gamma(N_MAX) * float(emb.grad.abs().max())
    torch.testing.assert_close(
        got["grad_embeddings"], emb.grad[lo : lo + sizes[rank]], rtol=0, atol=atol,
        msg=f"embedding grad rank {rank} {where}",
    )  # fmt: skip


def _check_triplet(case: dict, world_size: int, per_rank: list[dict]) -> None:
    emb, labels, _ = _batch(case["seed"], world_size, 4, case.get("unknown", "some"))
    emb.requires_grad_(True)
    loss = ref_triplet_loss(emb, labels, case["margin"], case["mining"], case["distance"])
    loss.backward()
    where = f"triplet {case} W={world_size}"
    sizes = BATCH_SIZES[world_size]
    if case.get("unknown") != "all":
        assert float(loss.detach()) > 0, where  # the case exercises something
    scale = _scale(emb)
    for rank, got in enumerate(per_rank):
        _assert_rank_matches(got, loss, emb, sizes, rank, where, scale)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_aux_losses_match_single_process_reference(world_size: int) -> None:
    results = run_ranks(_run_all, world_size)
    torch.set_default_dtype(torch.float32)
    for i, case in enumerate(_center_cases()):
        _check_center(case, world_size, [r["center"][i] for r in results])
    for i, case in enumerate(_triplet_cases()):
        _check_triplet(case, world_size, [r["triplet"][i] for r in results])


# ------------------------------------------------------------------ single process


def test_center_loss_initialisation() -> None:
    eye = ShardedCenterLoss(6, 6, magnitude=2.5).centers.detach()
    torch.testing.assert_close(eye, 2.5 * torch.eye(6), rtol=0, atol=0)  # exact: 2.5 * 1
    normal = ShardedCenterLoss(300, 64, magnitude=3.0, seed=1).centers.detach()
    assert normal.shape == (300, 64)
    # N(0, 9 / 64) per coordinate: |mu| / 3 is chi_64 / 8, mean sqrt(63.5) / 8 (0.4% low)
    # and sd 1 / (8 sqrt 2) = 0.088; 4 sd of a mean of 300 rows is 2.0%: 2.4% in all.
    chi_mean, chi_sd = math.sqrt(63.5) / 8, 1 / (8 * math.sqrt(2))
    rel = abs(chi_mean - 1) + 4 * chi_sd / math.sqrt(300)
    assert normal.norm(dim=1).mean().item() == pytest.approx(3.0, rel=rel)
    other_seed = ShardedCenterLoss(300, 64, magnitude=3.0, seed=2).centers.detach()
    assert not torch.equal(normal, other_seed)
    fixed = ShardedCenterLoss(6, 4, learnable=False)
    assert not any(True for _ in fixed.parameters())
    assert "centers" in fixed.state_dict()


def test_center_loss_no_known_label_is_connected_zero() -> None:
    loss_fn = ShardedCenterLoss(4, 3)
    x = torch.randn(5, 3, requires_grad=True)
    loss = loss_fn(x, torch.full((5,), -1))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.equal(loss_fn.centers.grad, torch.zeros_like(loss_fn.centers))
    empty = torch.zeros(0, 3, requires_grad=True)
    assert loss_fn(empty, torch.zeros(0, dtype=torch.int64)).requires_grad


def test_center_loss_pulls_embeddings_to_centres() -> None:
    """Gradient descent on embeddings and centres with the radius makes the loss 0."""
    torch.manual_seed(0)
    loss_fn = ShardedCenterLoss(3, 4, radius=0.05)
    x = torch.nn.Parameter(torch.randn(12, 4))
    labels = torch.arange(12) % 3
    opt = torch.optim.SGD([x, *loss_fn.parameters()], lr=0.5)
    for _ in range(60):
        opt.zero_grad()
        loss = loss_fn(x, labels)
        loss.backward()
        opt.step()
    assert loss.item() == 0.0  # every row within the radius: relu gives exact zeros


def test_aux_loss_option_errors() -> None:
    with pytest.raises(ValueError, match="distance"):
        ShardedCenterLoss(4, 3, distance="manhattan")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="radius"):
        ShardedCenterLoss(4, 3, radius=-1.0)
    with pytest.raises(ValueError, match="magnitude"):
        ShardedCenterLoss(4, 3, magnitude=0.0)
    # torch._assert_async: a RuntimeError at once on CPU (asynchronous on CUDA).
    with pytest.raises(RuntimeError, match=r"label is outside \[0, num_classes=4\)"):
        ShardedCenterLoss(4, 3)(torch.randn(2, 3), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"embeddings of shape \(batch, 3\)"):
        ShardedCenterLoss(4, 3)(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="mining"):
        TripletLoss(0.2, mining="hardest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distance"):
        TripletLoss(0.2, distance="euclidean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="margin"):
        TripletLoss(-0.1)


def test_triplet_half_precision_inputs_and_large_batch_chunks(monkeypatch) -> None:
    """Chunked mining (tiny chunk budget) gives the unchunked result; fp16 inputs
    are computed in fp32."""
    import partial_fc.triplet as triplet

    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 8, generator=g)
    labels = torch.randint(0, 6, (40,), generator=g)
    for mining in ("batch_all", "semi_hard"):
        whole = TripletLoss(0.5, mining)(x, labels)
        monkeypatch.setattr(triplet, "_CHUNK_ELEMENTS", 7)
        chunked = TripletLoss(0.5, mining)(x, labels)
        monkeypatch.undo()
        # chunks only fill integer per-pair counts; the loss is one expression over them
        torch.testing.assert_close(whole, chunked, rtol=0, atol=0)
    half = TripletLoss(0.5, "batch_hard")(x.half(), labels)
    assert half.dtype == torch.float32


@pytest.mark.parametrize("distance", ["squared_euclidean", "cosine"])
@pytest.mark.parametrize("mining", ["batch_all", "batch_hard"])
def test_triplet_peer_pytorch_metric_learning(distance: str, mining: str) -> None:
    """Peer check: pytorch-metric-learning's TripletMarginLoss with all triplets and
    the average over non-zero triplets (batch_all), or BatchHardMiner and a plain mean
    (batch_hard), with the equivalent distance."""
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import distances, losses, miners, reducers

    g = torch.Generator().manual_seed(9)
    x = torch.randn(24, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (24,), generator=g)
    if distance == "squared_euclidean":
        peer_distance = distances.LpDistance(normalize_embeddings=False, p=2, power=2)
    else:
        peer_distance = distances.CosineSimilarity()
    if mining == "batch_all":
        peer = losses.TripletMarginLoss(margin=0.4, distance=peer_distance)
        expected = peer(x, labels)
    else:
        peer = losses.TripletMarginLoss(
            margin=0.4, distance=peer_distance, reducer=reducers.MeanReducer()
        )
        miner = miners.BatchHardMiner(distance=peer_distance)
        expected = peer(x, labels, miner(x, labels))
    got = TripletLoss(0.4, mining, distance)(x, labels)
    # float64 both sides: <= 24^3 triplets of terms within 2 S gamma_{2D+6} (see N_MAX)
    atol = 2 * _scale(x) * gamma(24**3 + 2 * 6 + 6)
    assert math.isclose(float(got), float(expected), rel_tol=0, abs_tol=atol)
