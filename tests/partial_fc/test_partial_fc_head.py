"""The sharded head equals a plain single-process dense computation (loss,
gradients to the embeddings and to every weight shard, accuracy) on 1 to 4
gloo ranks, for every margin kind, sub-centres, chunking and ragged batches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from partial_fc import ArcFace, CombinedMargin, CosFace, PartialFC, SphereFace, adaptive_margins
from partial_fc.sharding import class_range
from tests.distributed import device_under_test, run_ranks
from tests.head_reference import MarginSpec, dense_loss
from tests.tolerances import UBF16, gamma

pytestmark = pytest.mark.on_device  # `pytest --device cuda` reruns these on the GPU

EMBEDDING_SIZE = 6
BATCH_SIZES = {1: [6], 2: [5, 2], 3: [4, 0, 3], 4: [3, 1, 5, 2]}
SAMPLE_RATE = 0.5
# A bound on a target logit's slope in the cosine, d phi / d cos, over this data:
# cos(theta + m) has sin(theta + m) / sin(theta) <= 1 / sin(theta), and the embeddings
# (their centre +- noise 0.3, at norm 2) keep theta >= ~4 degrees (1 / sin 4deg ~ 14);
# SphereFace's cos(m theta) has m sin(m theta) / sin(theta), m <= 4: at most 4 x 14.
MARGIN_SLOPE = 64


PADDED_CASES = ("arcface", "combined", "per_class_arcface")

# Inter-class filtering (threshold, mode) by case name; other cases run without it.
FILTERS = {"arcface_filter_remove": (0.2, "remove"), "arcface_filter_zero": (0.2, "zero")}


def _per_class(num_classes: int) -> list[float]:
    return [0.1 + 0.5 * ((7 * c) % num_classes) / num_classes for c in range(num_classes)]


def _counts(num_classes: int) -> list[int]:
    return [1 + (c * 13) % 9 for c in range(num_classes)]


# name -> (builder of the head's margin, the reference's MarginSpec), both given C.
MARGINS = {
    "arcface": (lambda c: ArcFace(64.0, 0.5), lambda c: MarginSpec(64.0, m2=0.5)),
    "arcface_easy": (
        lambda c: ArcFace(64.0, 0.5, easy_margin=True),
        lambda c: MarginSpec(64.0, m2=0.5, easy_margin=True),
    ),
    "arcface_straight_through": (
        lambda c: ArcFace(64.0, 0.5, straight_through=True),
        lambda c: MarginSpec(64.0, m2=0.5, straight_through=True),
    ),
    "cosface": (lambda c: CosFace(64.0, 0.35), lambda c: MarginSpec(64.0, m2=0.0, m3=0.35)),
    "sphereface": (lambda c: SphereFace(30.0, 4), lambda c: MarginSpec(30.0, m1=4.0, m2=0.0)),
    "sphereface_annealed": (
        # At step 0 the A-Softmax lambda is lambda_base.
        lambda c: SphereFace(30.0, 3, annealing=True, lambda_base=2.0, lambda_min=0.5),
        lambda c: MarginSpec(30.0, m1=3.0, m2=0.0, sphere_lambda=2.0),
    ),
    "combined": (
        lambda c: CombinedMargin(32.0, 1.2, 0.3, 0.2),
        lambda c: MarginSpec(32.0, m1=1.2, m2=0.3, m3=0.2),
    ),
    "combined_unit_m1": (
        lambda c: CombinedMargin(64.0, 1.0, 0.3, 0.2),
        lambda c: MarginSpec(64.0, m1=1.0, m2=0.3, m3=0.2),
    ),
    "per_class_arcface": (
        lambda c: ArcFace(64.0, _per_class(c)),
        lambda c: MarginSpec(64.0, m2=_per_class(c)),
    ),
    "arcface_filter_remove": (lambda c: ArcFace(64.0, 0.5), lambda c: MarginSpec(64.0, m2=0.5)),
    "arcface_filter_zero": (lambda c: ArcFace(64.0, 0.5), lambda c: MarginSpec(64.0, m2=0.5)),
    "adaptive_cosface": (
        lambda c: CosFace(64.0, adaptive_margins(_counts(c))),
        lambda c: MarginSpec(64.0, m2=0.0, m3=adaptive_margins(_counts(c)).tolist()),
    ),
}


def _case_data(
    seed: int, num_classes: int, k: int, world_size: int, few_classes: bool, ignore: bool
):
    """Global float64 data of one case: embeddings near, far from and opposite
    their centres, so every margin branch (incl. theta + m > pi) is taken."""
    g = torch.Generator().manual_seed(seed)
    batch = sum(BATCH_SIZES[world_size])
    weight = torch.randn(num_classes * k, EMBEDDING_SIZE, generator=g, dtype=torch.float64)
    high = max(1, num_classes // 2) if few_classes else num_classes
    labels = torch.randint(0, high, (batch,), generator=g)
    # float64 from the start: the ranks run with float64 as the default dtype and the
    # parent with float32, where 0.6 and -0.8 would round (a 1e-7 change in the loss)
    pull = torch.tensor([1.0, 0.0, -1.0, 0.6, -0.8], dtype=torch.float64)[torch.arange(batch) % 5]
    centre = weight[labels * k] / weight[labels * k].norm(dim=1, keepdim=True)
    noise = 0.3 * torch.randn(batch, EMBEDDING_SIZE, generator=g, dtype=torch.float64)
    embeddings = 2.0 * (pull[:, None] * centre + noise)
    if ignore:
        labels[1] = -1
    return embeddings, weight, labels


def _cases(world_size: int) -> list[dict]:
    cases = []
    seed = 0
    for name in MARGINS:
        for num_classes in (7, 10, 37):
            for k in (1, 3):
                seed += 1
                cases.append(
                    dict(
                        name=name,
                        seed=seed,
                        num_classes=num_classes,
                        k=k,
                        few_classes=num_classes == 37,  # some ranks own no positive
                        ignore=name == "arcface" and k == 3,
                        world_size=world_size,
                    )
                )
    return cases


def _run_head(
    rank: int,
    world_size: int,
    case: dict,
    chunk: int,
    sample_rate: float = 1.0,
    max_local_batch: int | None = None,
):
    embeddings, weight, labels = _case_data(
        case["seed"],
        case["num_classes"],
        case["k"],
        world_size,
        case["few_classes"],
        case["ignore"],
    )
    device = device_under_test()
    embeddings, labels = embeddings.to(device), labels.to(device)
    sizes = BATCH_SIZES[world_size]
    lo = sum(sizes[:rank])
    head = PartialFC(
        case["num_classes"],
        EMBEDDING_SIZE,
        MARGINS[case["name"]][0](case["num_classes"]),
        num_subcenters=case["k"],
        sample_rate=sample_rate,
        chunk_classes=chunk,
        ignore_index=-1 if case["ignore"] else None,
        interclass_filtering_threshold=FILTERS.get(case["name"], (None,))[0],
        interclass_filtering_mode=FILTERS.get(case["name"], (None, "remove"))[1],
        max_local_batch=max_local_batch,
        dtype=torch.float64,
        device=device,
    )
    k = case["k"]
    with torch.no_grad():
        head.weight.copy_(weight[head.class_start * k : (head.class_start + head.num_local) * k])
    local = embeddings[lo : lo + sizes[rank]].clone().requires_grad_(True)
    loss = head(local, labels[lo : lo + sizes[rank]])
    loss.backward()
    sampled = None if head.last_sampled is None else (head.last_sampled + head.class_start).cpu()
    return dict(  # on the CPU: the parent process compares them with the reference
        loss=loss.detach().cpu(),
        grad_embeddings=local.grad.cpu(),
        # A sampled step's gradient is sparse (its rows only); compare it densely.
        grad_weight=head.weight.grad.cpu().to_dense(),
        class_start=head.class_start,
        num_local=head.num_local,
        accuracy=float(head.accuracy),
        sampled=sampled,
    )


def _run_matrix(rank: int, world_size: int) -> list[list[dict]]:
    torch.set_default_dtype(torch.float64)
    out = []
    for case in _cases(world_size):
        variants = [dict(chunk=2), dict(chunk=1 << 20)]
        if case["name"] in PADDED_CASES:  # fixed-size gather, no batch-size exchange
            variants.append(dict(chunk=3, max_local_batch=max(BATCH_SIZES[world_size])))
        out.append([_run_head(rank, world_size, case, **variant) for variant in variants])
    return out


def _check(case: dict, per_rank: list[dict], classes: torch.Tensor | None = None) -> None:
    world_size = case["world_size"]
    embeddings, weight, labels = _case_data(
        case["seed"],
        case["num_classes"],
        case["k"],
        world_size,
        case["few_classes"],
        case["ignore"],
    )
    embeddings.requires_grad_(True)
    weight.requires_grad_(True)
    spec = MARGINS[case["name"]][1](case["num_classes"])
    threshold, mode = FILTERS.get(case["name"], (None, "remove"))
    loss, correct = dense_loss(
        embeddings, weight, labels, spec, case["k"], -1 if case["ignore"] else None, classes,
        filter_threshold=threshold, filter_mode=mode,
    )  # fmt: skip
    loss.backward()
    keep = labels != -1
    expected_accuracy = float(correct[keep].double().mean())
    sizes = BATCH_SIZES[world_size]
    k = case["k"]
    n_logits = case["num_classes"] * k
    # float64 both sides, different orders and partitions: a cosine carries 2 D + 6
    # roundings (dot, two norms), a logit that times the margin's slope and the scale.
    logit_atol = spec.scale * MARGIN_SLOPE * gamma(2 * EMBEDDING_SIZE + 6)
    # A gradient entry sums the softmax's C*K and the batch's B terms, each within the
    # logit error of itself: gamma_n times the slope, of B x the largest entry.
    grad_rtol = sum(sizes) * MARGIN_SLOPE * gamma(n_logits + sum(sizes) + 2 * EMBEDDING_SIZE + 6)
    where = f"{case['name']} C={case['num_classes']} K={k} W={world_size}"
    for rank, got in enumerate(per_rank):
        start, count = class_range(case["num_classes"], rank, world_size)
        assert (got["class_start"], got["num_local"]) == (start, count), where
        # log-sum-exp has condition 1 in the log domain: the logits' error, + the C*K-term
        # sum of exponentials and the batch mean, relative to the loss
        torch.testing.assert_close(
            got["loss"], loss.detach(), rtol=gamma(n_logits + sum(sizes)), atol=logit_atol,
            msg=where,
        )  # fmt: skip
        lo = sum(sizes[:rank])
        torch.testing.assert_close(
            got["grad_embeddings"], embeddings.grad[lo : lo + sizes[rank]], rtol=0,
            atol=grad_rtol * float(embeddings.grad.abs().max()),
            msg=f"embedding grad, rank {rank}, {where}",
        )  # fmt: skip
        torch.testing.assert_close(
            got["grad_weight"], weight.grad[start * k : (start + count) * k], rtol=0,
            atol=grad_rtol * float(weight.grad.abs().max()),
            msg=f"weight grad, rank {rank}, {where}",
        )  # fmt: skip
        assert got["accuracy"] == pytest.approx(expected_accuracy), where


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_head_matches_dense_reference(world_size: int) -> None:
    results = run_ranks(_run_matrix, world_size)
    torch.set_default_dtype(torch.float32)
    for i, case in enumerate(_cases(world_size)):
        # Chunked, unchunked and padded runs all equal the reference.
        for variant in range(len(results[0][i])):
            _check(case, [results[r][i][variant] for r in range(world_size)])


def _run_sampled(rank: int, world_size: int) -> list[dict]:
    out = []
    for case in _cases(world_size):
        if (
            case["name"] in ("arcface", "per_class_arcface", "combined")
            and case["num_classes"] == 37
        ):
            out.append(_run_head(rank, world_size, case, chunk=3, sample_rate=SAMPLE_RATE))
    return out


@pytest.mark.parametrize("world_size", [1, 3])
def test_sampled_head_matches_dense_reference_on_the_sampled_classes(world_size: int) -> None:
    results = run_ranks(_run_sampled, world_size)
    cases = [
        c
        for c in _cases(world_size)
        if c["name"] in ("arcface", "per_class_arcface", "combined") and c["num_classes"] == 37
    ]
    assert len(results[0]) == len(cases)
    for i, case in enumerate(cases):
        per_rank = [results[r][i] for r in range(world_size)]
        _, _, labels = _case_data(case["seed"], 37, case["k"], world_size, True, case["ignore"])
        positives = set(labels[labels >= 0].tolist())
        for got in per_rank:
            own = {
                c
                for c in positives
                if got["class_start"] <= c < got["class_start"] + got["num_local"]
            }
            # A size fixed by the shapes: at least the global batch, so positives fit.
            num_local = got["num_local"]
            expected = min(num_local, max(round(SAMPLE_RATE * num_local), labels.numel()))
            assert got["sampled"].numel() == expected
            assert own <= set(got["sampled"].tolist())
        classes = torch.cat([got["sampled"] for got in per_rank])
        _check(case, per_rank, classes)


def test_adaptive_margins_formula_and_equal_counts() -> None:
    counts = torch.tensor([1, 16, 81, 0])
    margins = adaptive_margins(counts, m_min=0.05, m_max=0.5, power=-0.25)
    f = torch.tensor([1.0, 0.5, 1 / 3, 1.0])  # n ** -0.25, zero counted as one
    expected = 0.45 * (f - f.min()) / (f.max() - f.min()) + 0.05
    torch.testing.assert_close(margins, expected.double())
    same = adaptive_margins([5, 5, 5])
    assert torch.isfinite(same).all() and torch.equal(
        same, torch.full((3,), 0.5, dtype=torch.float64)
    )


def test_margin_derivative_matches_autograd_of_its_value() -> None:
    torch.manual_seed(0)
    cos = torch.linspace(-0.999, 0.999, 301, dtype=torch.float64)
    classes = torch.zeros_like(cos, dtype=torch.int64)
    for margin in (
        ArcFace(64.0, 0.5),
        ArcFace(64.0, 0.5, easy_margin=True),
        CosFace(64.0, 0.35),
        SphereFace(30.0, 4),
        SphereFace(30.0, 2.5, annealing=True),
        CombinedMargin(32.0, 1.3, 0.2, 0.1),
    ):
        x = cos.clone().requires_grad_(True)
        value, slope = margin.target_logit(x, classes, step=3)
        (grad,) = torch.autograd.grad(value.sum(), x)
        # Two float64 formulas of <= 16 roundings each; sin(theta) = sqrt(1 - c^2) cancels
        # near |c| = 0.999, relative condition 1 / (1 - c^2) = 500.
        rtol = 2 * gamma(16 + round(1 / (1 - 0.999**2)))
        torch.testing.assert_close(slope, grad, rtol=rtol, atol=0, msg=repr(margin))
        if not margin.easy_margin:  # easy_margin jumps back up at 90 degrees by design
            # The target logit never increases with the angle (cosine falling): two
            # neighbours, each within gamma_16 of the largest |value|, may tie.
            slack = 2 * gamma(16) * float(value.abs().max())
            assert bool((value[1:] >= value[:-1] - slack).all()), repr(margin)


def test_sphereface_lambda_schedule() -> None:
    margin = SphereFace(annealing=True)
    assert margin.annealing_lambda(0) == 1000.0
    assert margin.annealing_lambda(100) == pytest.approx(1000.0 / (1 + 0.12 * 100))
    assert margin.annealing_lambda(10**6) == 5.0
    assert SphereFace().annealing_lambda(10) == 0.0


def test_per_class_margins_from_file_and_set_margins(tmp_path) -> None:
    path = tmp_path / "margins.txt"
    path.write_text("# one per class\n0.1\n0.2\n\n0.3\n")
    head = PartialFC(3, 4, ArcFace(64.0, str(path)), dtype=torch.float64)
    torch.testing.assert_close(head.margin.m2, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    head.set_margins([0.4, 0.5, 0.6])
    torch.testing.assert_close(head.margin.m2, torch.tensor([0.4, 0.5, 0.6], dtype=torch.float64))
    with pytest.raises(ValueError, match="expected 1 or num_classes=3"):
        head.set_margins([0.1, 0.2])
    path.write_text("0.1\nabc\n")
    with pytest.raises(ValueError, match=r"margins.txt:2: not a margin value"):
        ArcFace(64.0, str(path))
    with pytest.raises(ValueError, match="2 per-class margins but num_classes=3"):
        PartialFC(3, 4, ArcFace(64.0, [0.1, 0.2]))


@pytest.mark.parametrize("bad", [-2, 10, 123])
def test_out_of_range_labels_raise(bad: int, device: torch.device) -> None:
    head = PartialFC(10, 4, ArcFace(), device=device)
    labels = torch.tensor([1, bad, 3], device=device)
    # A device-side assert: no value is read back, so the message names the range.
    with pytest.raises(RuntimeError, match=r"a label is outside \[0, num_classes=10\)"):
        head(torch.randn(3, 4, device=device), labels)


def test_ignore_index_must_not_be_a_class() -> None:
    with pytest.raises(ValueError, match="ignore_index=3 is a real class id"):
        PartialFC(10, 4, ArcFace(), ignore_index=3)


def test_loss_is_not_capped(device: torch.device) -> None:
    # A sample pointing away from its centre with a large scale: arcface_torch's
    # clamped probability would cap this loss at 69.08.
    head = PartialFC(2, 2, CosFace(scale=100.0, margin=0.0), dtype=torch.float64, device=device)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64))
    x = torch.tensor([[-1.0, 0.0]], dtype=torch.float64, device=device)
    loss = head(x, torch.tensor([0], device=device))
    assert loss.item() == pytest.approx(200.0 + math.log1p(math.exp(-200.0)))


def test_head_computes_in_fp32_under_autocast(device: torch.device) -> None:
    torch.manual_seed(0)
    head = PartialFC(20, 8, ArcFace(), device=device)
    x = torch.randn(6, 8).to(device)
    y = torch.randint(0, 20, (6,)).to(device)
    plain = head(x, y)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        mixed = head(x.to(torch.bfloat16), y)
    assert mixed.dtype == torch.float32
    # Only the bf16 rounding of the input embeddings differs.
    reference = head(x.to(torch.bfloat16).float(), y)
    # the same fp32 operations: bitwise on the CPU (CUDA may reorder its reductions)
    exact = dict(rtol=0, atol=0) if device.type == "cpu" else {}
    torch.testing.assert_close(mixed, reference, **exact)
    assert plain.dtype == torch.float32


def test_initial_centres_do_not_depend_on_world_size() -> None:
    full = PartialFC(37, 5, ArcFace(), num_subcenters=2, seed=3).weight
    for world_size in (2, 3, 4):
        for rank in range(world_size):
            start, count = class_range(37, rank, world_size)
            shard = torch.empty(count * 2, 5)
            head = PartialFC.__new__(PartialFC)
            torch.nn.Module.__init__(head)
            head.num_classes, head.class_start, head.num_local = 37, start, count
            head.num_subcenters, head.embedding_size, head.seed = 2, 5, 3
            head.weight = torch.nn.Parameter(shard)
            head.reset_parameters()
            torch.testing.assert_close(head.weight, full[start * 2 : (start + count) * 2])


def test_bf16_matrix_products_stay_close_to_fp32(device: torch.device) -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 32).to(device)
    y = torch.randint(0, 300, (16,)).to(device)
    results = []
    for matmul_dtype in (None, torch.bfloat16):
        head = PartialFC(
            300, 32, ArcFace(), chunk_classes=100, matmul_dtype=matmul_dtype, device=device
        )
        xi = x.clone().requires_grad_(True)
        loss = head(xi, y)
        loss.backward()
        assert loss.dtype == torch.float32 and head.weight.grad.dtype == torch.float32
        results.append((loss.detach(), xi.grad, head.weight.grad))
    # The test is the fp32-bf16 gap, a statistical bound: each product of bf16-rounded
    # operands and the rounded sum carry independent errors of sd UBF16 / sqrt(3) (round
    # to nearest, uniform), so cos_ij has variance UBF16^2 / 3 (2 sum_k x_k^2 w_k^2 +
    # cos^2). The loss moves by the target logits' errors (64 cos; slope <= 1.1 at these
    # |cos| <= 0.35), averaged over the batch; the log-sum-exp term averages 300 logits'
    # errors and is smaller. 4 sd of that: 0.05 on a loss near 60 (8e-4; the old rtol: 2e-2).
    xn = F.normalize(x.double().cpu(), dim=1)
    wn = F.normalize(head.weight.detach().double().cpu(), dim=1)
    target = (torch.arange(16), y.cpu())
    var = UBF16**2 / 3 * (2 * (xn**2) @ (wn**2).T + (xn @ wn.T) ** 2)[target]
    atol = 4 * 64.0 * 1.1 * float(var.sum().sqrt()) / 16
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=atol)
    # The gradients: the same model gives sd(logit) = 64 sd(cos) ~ 5% of a probability,
    # normwise; the gradients move by about that. Kept at 5% (measured 0.9%).
    for a, b in zip(results[0][1:], results[1][1:], strict=True):
        assert torch.linalg.vector_norm(a - b) <= 0.05 * torch.linalg.vector_norm(a)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_head_on_cuda_matches_cpu_under_autocast() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 32)
    y = torch.randint(0, 100, (16,))
    results = []
    for device in ("cpu", "cuda"):
        head = PartialFC(100, 32, ArcFace(), num_subcenters=2, sample_rate=0.5, device=device)
        xi = x.to(device).requires_grad_(True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = head(xi, y.to(device))
        assert loss.dtype == torch.float32
        loss.backward()
        results.append((loss.detach().cpu(), xi.grad.cpu(), head.weight.grad.cpu()))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_padded_batch_larger_than_max_local_batch_raises() -> None:
    results = run_ranks(_run_too_large, 2)
    assert all("exceeds max_local_batch=2" in message for message in results)


def _run_too_large(rank: int, world_size: int) -> str:
    head = PartialFC(10, 4, ArcFace(), max_local_batch=2)
    try:
        head(torch.randn(3, 4), torch.tensor([1, 2, 3]))
    except ValueError as error:
        return str(error)
    return "no error"


def test_embeddings_of_the_wrong_shape_are_refused(device: torch.device) -> None:
    head = PartialFC(10, 4, ArcFace(), device=device)
    with pytest.raises(ValueError, match=r"embeddings of shape \(batch, 4\), got \(2, 5\)"):
        head(torch.randn(2, 5, device=device), torch.tensor([0, 1], device=device))
    with pytest.raises(ValueError, match=r"embeddings of shape \(batch, 4\), got \(4,\)"):
        head(torch.randn(4, device=device), torch.tensor([0], device=device))
