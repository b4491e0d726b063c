"""AdaFace, MagFace, CurricularFace and ElasticFace on the sharded head equal a dense
float64 single-process reference written here from the papers' published code
(statistics over the global batch), on 1-3 gloo ranks with ragged batches,
sampling, chunking and K=3 sub-centres; their EMA state is the reference's and the
same on every rank, and travels in the head's state_dict."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from partial_fc import AdaFace, CurricularFace, ElasticFace, MagFace, PartialFC
from partial_fc.sharding import class_range
from tests.distributed import run_ranks
from tests.tolerances import gamma

CLASSES, DIM, STEPS = 30, 8, 3
BATCHES = {1: [7], 2: [5, 3], 3: [4, 0, 3]}
SCALE = 16.0  # every margin below
# float64 both sides, different formulas and partitions. A cosine carries 2 DIM + 6
# roundings (dot, two norms); a target logit's slope in it is at most 1 / sin(theta) over
# these random 8-dim rows (theta within 10 degrees of 0 or pi: 1 / sin 10deg < 6).
SLOPE = 6.0
LOGIT_ATOL = SCALE * SLOPE * gamma(2 * DIM + 6)
# A gradient entry sums the softmax's (<= 3 CLASSES logits) and the batch's (<= 8 rows)
# terms, each within LOGIT error of itself: gamma_n of the largest entry, times SLOPE.
GRAD_RTOL = SLOPE * gamma(3 * CLASSES + 8 + 2 * DIM + 6)


def _margin(name: str):
    return {
        "adaface": lambda: AdaFace(16.0, 0.4, h=0.333, t_alpha=0.3),
        "magface": lambda: MagFace(16.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=3.5),
        "curricular": lambda: CurricularFace(16.0, 0.5, t_alpha=0.3),
        "elastic_arc": lambda: ElasticFace(16.0, 0.5, std=0.05, kind="arc"),
        "elastic_cos_plus": lambda: ElasticFace(16.0, 0.35, std=0.05, kind="cos", plus=True),
    }[name]()


def _global_batch(step: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    norms = torch.empty(total, 1, dtype=torch.float64).uniform_(5.0, 150.0, generator=g)
    x = F.normalize(torch.randn(total, DIM, generator=g, dtype=torch.float64)) * norms
    y = torch.randint(0, CLASSES, (total,), generator=g)
    return x, y


def _run(rank: int, world: int, name: str, k: int, rate: float, chunk: int) -> dict:
    sizes = BATCHES[world]
    head = PartialFC(
        CLASSES, DIM, _margin(name), k, sample_rate=rate, chunk_classes=chunk, seed=5,
        dtype=torch.float64,
    )  # fmt: skip
    lo = sum(sizes[:rank])
    out = {"class_start": head.class_start, "steps": []}
    for step in range(STEPS):
        x, y = _global_batch(step, sum(sizes))
        local = x[lo : lo + sizes[rank]].clone().requires_grad_(True)
        loss = head(local, y[lo : lo + sizes[rank]])
        loss.backward()
        grad = head.weight.grad
        sampled = head.last_sampled
        out["steps"].append(
            {
                "loss": loss.detach(),
                "x_grad": local.grad,
                "w_grad": grad.to_dense() if grad.layout == torch.sparse_coo else grad,
                "weight": head.weight.detach().clone(),
                "sampled": None if sampled is None else sampled + head.class_start,
                "buffers": {n: b.clone() for n, b in head.margin.named_buffers()},
                "margins": getattr(head.margin, "last_margins", None),
            }
        )
        head.weight.grad = None
    out["state"] = {k: v for k, v in head.state_dict().items() if k.startswith("margin.")}
    return out


# ------------------------------------------------------------------ the reference
def _arc_logit(c: torch.Tensor, m: torch.Tensor | float) -> torch.Tensor:
    """ArcFace with its fallback, for one sample (autograd)."""
    m = torch.as_tensor(m, dtype=c.dtype)
    if m > 0 and c.item() <= math.cos(math.pi - m.item()):
        return c - m * torch.sin(m)
    return torch.cos(torch.acos(c.clamp(-1, 1)) + m)


def _reference_step(name, margin_state, x, y, weight, k, classes, elastic):
    """One step of the dense reference: (loss, grad x, grad weight); updates margin_state."""
    x = x.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    s = 16.0
    cos = F.normalize(x) @ F.normalize(w).t()
    cos = cos.view(x.shape[0], CLASSES, k).max(dim=2).values  # (B, C)
    cos = cos[:, classes]
    col = {int(c): j for j, c in enumerate(classes)}
    target = torch.tensor([col[int(c)] for c in y])
    tcos = cos[torch.arange(len(y)), target]
    norms = x.norm(dim=1)
    logits = s * cos
    rows = []
    extra = 0.0
    if name == "adaface":
        n = norms.detach().clamp(0.001, 100.0)
        a = 0.3
        margin_state["mean"] = a * n.mean() + (1 - a) * margin_state["mean"]
        margin_state["std"] = a * n.std() + (1 - a) * margin_state["std"]
        g = (0.333 * (n - margin_state["mean"]) / (margin_state["std"] + 1e-3)).clamp(-1, 1)
    if name == "curricular":
        margin_state["t"] = 0.3 * tcos.detach().mean() + 0.7 * margin_state["t"]
    for i in range(len(y)):
        c, row = tcos[i], logits[i]
        if name == "adaface":
            theta = torch.acos(c.clamp(-1 + 1e-3, 1 - 1e-3))
            theta_m = (theta - 0.4 * g[i]).clamp(1e-3, math.pi - 1e-3)
            target_logit = s * (torch.cos(theta_m) - 0.4 - 0.4 * g[i])
        elif name == "magface":
            a_i = norms[i].clamp(10.0, 110.0)
            m = 0.45 + (0.8 - 0.45) / 100.0 * (a_i - 10.0)
            target_logit = s * _arc_logit(c, m)
            extra = extra + 3.5 * (a_i / 110.0**2 + 1.0 / a_i) / len(y)
        elif name == "curricular":
            t = margin_state["t"]
            thr = c.detach() * math.cos(0.5) - torch.sqrt(1 - c.detach() ** 2) * math.sin(0.5)
            cr = cos[i]
            hard = cr.detach() > thr
            row = s * torch.where(hard, cr * (t + cr), cr)
            target_logit = s * _arc_logit(c, 0.5)
        elif name == "elastic_arc":
            target_logit = s * _arc_logit(c, elastic[i])
        else:  # elastic_cos_plus
            target_logit = s * (c - elastic[i])
        j = int(target[i])
        rows.append(torch.cat([row[:j], target_logit.view(1), row[j + 1 :]]))
    loss = F.cross_entropy(torch.stack(rows), target) + extra
    loss.backward()
    return loss.detach(), x.grad, w.grad


CASES = [  # (margin, K, sample rate, chunk classes)
    ("adaface", 3, 1.0, 7),
    ("magface", 1, 1.0, 100),
    ("magface", 3, 0.5, 4),
    ("curricular", 1, 1.0, 6),
    ("curricular", 3, 0.5, 100),
    ("elastic_arc", 3, 1.0, 5),
    ("elastic_cos_plus", 1, 0.5, 100),
]


def _run_cases(rank: int, world: int) -> list[dict]:
    """Every case in one set of spawned ranks (spawning costs a torch import each)."""
    return [_run(rank, world, *case) for case in CASES if world < 3 or case[0] in THREE_RANKS]


THREE_RANKS = ("adaface", "curricular")  # 3 ranks: the two EMA margins show agreement


@pytest.mark.parametrize("world", [1, 2, 3])
def test_batch_margins_equal_the_dense_reference(world: int) -> None:
    cases = [case for case in CASES if world < 3 or case[0] in THREE_RANKS]
    per_case = list(zip(*run_ranks(_run_cases, world), strict=True))
    assert len(per_case) == len(cases)
    for (name, k, rate, _), results in zip(cases, per_case, strict=True):
        _check_case(name, k, rate, list(results), BATCHES[world])


def _check_case(name: str, k: int, rate: float, results: list[dict], sizes: list[int]) -> None:
    state = {"mean": torch.tensor(20.0, dtype=torch.float64),
             "std": torch.tensor(100.0, dtype=torch.float64),
             "t": torch.tensor(0.0, dtype=torch.float64)}  # fmt: skip
    weight = torch.cat([r["steps"][0]["weight"] for r in results])  # global, class order
    for step in range(STEPS):
        per_rank = [r["steps"][step] for r in results]
        x, y = _global_batch(step, sum(sizes))
        if rate < 1.0:
            classes = torch.sort(torch.cat([p["sampled"] for p in per_rank])).values
        else:
            classes = torch.arange(CLASSES)
        elastic = per_rank[0]["margins"]
        for p in per_rank[1:]:
            assert p["margins"] is None or torch.equal(p["margins"], elastic)
        loss, x_grad, w_grad = _reference_step(name, state, x, y, weight, k, classes, elastic)
        where = f"{name} K={k} rate={rate} W={len(results)} step {step}"
        for p in per_rank:
            # log-sum-exp has condition 1: the logits' error, + the mean over the batch
            torch.testing.assert_close(p["loss"], loss, rtol=gamma(8), atol=LOGIT_ATOL, msg=where)
        got_x = torch.cat([p["x_grad"] for p in per_rank])
        atol = GRAD_RTOL * float(x_grad.abs().max())
        torch.testing.assert_close(got_x, x_grad, rtol=0, atol=atol, msg=where)
        got_w = torch.cat([p["w_grad"] for p in per_rank])
        atol = GRAD_RTOL * float(w_grad.abs().max())
        torch.testing.assert_close(got_w, w_grad, rtol=0, atol=atol, msg=where)
        # The EMA state: the reference's, on every rank.
        for p in per_rank:
            buffers = p["buffers"]
            # EMAs over step + 1 steps of a batch mean/std (<= 8 rows) of norms (DIM + 2
            # roundings each), 4 roundings per update and a sqrt: relative error gamma_n.
            n = (step + 1) * (8 + 2 * DIM + 10)
            if "batch_mean" in buffers:
                mean, std = buffers["batch_mean"], buffers["batch_std"]
                torch.testing.assert_close(mean, state["mean"], rtol=gamma(n), atol=0, msg=where)
                torch.testing.assert_close(std, state["std"], rtol=gamma(n), atol=0, msg=where)
            if "t" in buffers:
                # t averages target cosines (|c| <= 1): absolute, per the cosine's error
                torch.testing.assert_close(
                    buffers["t"], state["t"], rtol=0, atol=gamma(n), msg=where
                )
    for r in results[1:]:
        for key, value in r["state"].items():
            assert torch.equal(value, results[0]["state"][key]), (where, key)


def _ema_after_resume(rank: int, world: int, state: dict) -> dict:
    head = PartialFC(CLASSES, DIM, AdaFace(16.0, 0.4, t_alpha=0.3), dtype=torch.float64)
    head.load_state_dict({**head.state_dict(), **state})
    return {n: b.clone() for n, b in head.margin.named_buffers()}


def test_ema_state_resumes_bit_identically_on_another_world_size() -> None:
    saved = run_ranks(_run, 2, "adaface", 1, 1.0, 100)[0]["state"]
    assert float(saved["margin.batch_mean"]) != 20.0  # it moved
    for buffers in run_ranks(_ema_after_resume, 3, saved):
        assert torch.equal(buffers["batch_mean"], saved["margin.batch_mean"])
        assert torch.equal(buffers["batch_std"], saved["margin.batch_std"])


def test_elastic_margins_are_drawn_alike_everywhere_and_plus_orders_them() -> None:
    results = run_ranks(_run, 2, "elastic_cos_plus", 1, 1.0, 100)
    for step in range(STEPS):
        margins = [r["steps"][step]["margins"] for r in results]
        assert torch.equal(margins[0], margins[1])
        x, y = _global_batch(step, 8)
        weight = torch.cat([r["steps"][step]["weight"] for r in results])
        tcos = (F.normalize(x) @ F.normalize(weight).t())[torch.arange(8), y]
        order = torch.argsort(tcos, descending=True)
        assert torch.all(margins[0][order][1:] >= margins[0][order][:-1])
    assert not torch.equal(results[0]["steps"][0]["margins"], results[0]["steps"][1]["margins"])


def test_class_ranges_used_by_the_reference_match_the_head() -> None:
    starts = [class_range(CLASSES, r, 3)[0] for r in range(3)]
    assert [r["class_start"] for r in run_ranks(_run, 3, "adaface", 1, 1.0, 100)] == starts
