"""The distillation losses (:mod:`partial_fc.distill`) against a dense float64
reference on 1-3 gloo ranks with ragged batches (a rank may hold no row), their
world-size invariance, the gradients stated in their docstrings, and no host sync."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from partial_fc.distill import Distiller, embedding_distill_loss, relation_distill_loss
from tests.dispatch_count import DispatchCounter
from tests.distributed import run_ranks
from tests.tolerances import gamma

B, DS, DT = 7, 5, 3
SIZES = {1: [7], 2: [5, 2], 3: [3, 0, 4]}
CASES = [
    (kind, dt, pad)
    for kind in ("cosine", "l2")
    for dt in (DS, DT)  # identity projection, learned projection
    for pad in (False, True)
]

# float64 both sides, different orders and partitions. A loss is a mean of terms bounded
# by 4 (|u - v|^2, (u_i.u_j - v_i.v_j)^2 of unit rows); each term is within gamma_n of it,
# n = two normalisations and a dot (2 (DS + 3) + DS), a projection (DS), the squares (2)
# and the B^2-term sum: an absolute error <= 4 gamma_n.
N_OPS = B * B + 4 * DS + 8
LOSS_ATOL = 4 * gamma(N_OPS)
# A gradient entry sums at most B rows' N_OPS-rounded terms: within gamma(B + N_OPS) of
# the sum of their magnitudes, which the largest reference entry bounds to within B.
GRAD_RTOL = B * gamma(B + N_OPS)


def _data(teacher_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    s = torch.randn(B, DS, generator=g, dtype=torch.float64)
    t = torch.randn(B, teacher_dim, generator=g, dtype=torch.float64)
    p = torch.randn(teacher_dim, DS, generator=g, dtype=torch.float64)
    return s, t, p


def _reference(
    kind: str, teacher_dim: int
) -> dict[str, tuple[float, torch.Tensor, torch.Tensor | None]]:
    """Dense float64 values and gradients (student rows, projection) of the global loss."""
    s, t, p = _data(teacher_dim)
    out = {}
    s_leaf = s.clone().requires_grad_(True)
    p_leaf = p.clone().requires_grad_(True)
    proj = s_leaf @ p_leaf.T if teacher_dim != DS else s_leaf
    u, v = F.normalize(proj, dim=1), F.normalize(t, dim=1)
    per_row = (u - v).pow(2).sum(1) if kind == "l2" else 1 - (u * v).sum(1)
    emb = per_row.mean()
    gs, *gp = torch.autograd.grad(emb, [s_leaf] + ([p_leaf] if teacher_dim != DS else []))
    out["embedding"] = (emb.item(), gs, gp[0] if gp else None)
    s_leaf = s.clone().requires_grad_(True)
    us = F.normalize(s_leaf, dim=1)
    rel = ((us @ us.T - v @ v.T) ** 2).sum() / B**2
    (gs,) = torch.autograd.grad(rel, [s_leaf])
    out["relation"] = (rel.item(), gs, None)
    return out


def _rank_fn(rank: int, world_size: int) -> list:
    torch.manual_seed(0)
    sizes = SIZES[world_size]
    start = sum(sizes[:rank])
    results = []
    for kind, dt, pad in CASES:
        s, t, p = _data(dt)
        local_s = s[start : start + sizes[rank]].clone().requires_grad_(True)
        local_t = t[start : start + sizes[rank]]
        dist = Distiller(
            DS, dt, embedding=kind, relation=True, max_local_batch=max(sizes) if pad else None
        )
        dist.double()
        if dist.projection is not None:
            with torch.no_grad():
                dist.projection.weight.copy_(p)
        counter = DispatchCounter()
        with counter:
            terms = dist(local_s, local_t)
            grads = {}
            for name in ("embedding", "relation"):
                params = [local_s] + (
                    [dist.projection.weight]
                    if dist.projection is not None and name == "embedding"
                    else []
                )
                got = torch.autograd.grad(terms[name], params, retain_graph=True, allow_unused=True)
                grads[name] = (terms[name].detach(), got[0], got[1] if len(got) > 1 else None)
        results.append(((kind, dt, pad), grads, counter.host_syncs))
    return results


@pytest.fixture(scope="module")
def per_world_size() -> dict[int, list]:
    return {ws: run_ranks(_rank_fn, ws) for ws in (1, 2, 3)}


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_losses_and_gradients_match_dense_reference(per_world_size, world_size: int) -> None:
    sizes = SIZES[world_size]
    for rank, rank_results in enumerate(per_world_size[world_size]):
        start = sum(sizes[:rank])
        for (kind, dt, pad), grads, _ in rank_results:
            ref = _reference(kind, dt)
            for name, (value, gs, gp) in grads.items():
                ref_value, ref_gs, ref_gp = ref[name]
                where = f"{name} {kind} dt={dt} pad={pad} rank {rank}/{world_size}"
                assert value.dtype == torch.float64, where
                assert value.item() == pytest.approx(ref_value, rel=0, abs=LOSS_ATOL), where
                atol = GRAD_RTOL * float(ref_gs.abs().max())
                torch.testing.assert_close(
                    gs, ref_gs[start : start + sizes[rank]], rtol=0, atol=atol, msg=where
                )
                if ref_gp is not None:
                    atol = GRAD_RTOL * float(ref_gp.abs().max())
                    torch.testing.assert_close(gp, ref_gp, rtol=0, atol=atol, msg=where)


def test_relation_loss_world_size_invariant(per_world_size) -> None:
    """The same global batch split over 1, 2 or 3 ranks gives the same relation value
    and the same gradient for every row."""
    for case_index, case in enumerate(CASES):
        values, row_grads = [], []
        for ws in (1, 2, 3):
            results = per_world_size[ws]
            values.append(results[0][case_index][1]["relation"][0].item())
            row_grads.append(torch.cat([r[case_index][1]["relation"][1] for r in results]))
        # Both sides carry the bound: twice LOSS_ATOL and twice GRAD_RTOL.
        assert values[1] == pytest.approx(values[0], rel=0, abs=2 * LOSS_ATOL), case
        assert values[2] == pytest.approx(values[0], rel=0, abs=2 * LOSS_ATOL), case
        atol = 2 * GRAD_RTOL * float(row_grads[0].abs().max())
        for g in row_grads[1:]:
            torch.testing.assert_close(g, row_grads[0], rtol=0, atol=atol)


def test_no_host_sync_with_max_local_batch(per_world_size) -> None:
    """Forward and backward of both terms dispatch nothing that would wait for a GPU
    when every rank pads to ``max_local_batch`` (and on one rank in any case)."""
    for ws, results in per_world_size.items():
        for rank_results in results:
            for (kind, dt, pad), _, syncs in rank_results:
                if pad or ws == 1:
                    assert syncs == [], (ws, kind, dt, syncs)


def test_docstring_gradients() -> None:
    """The gradients written in the docstrings equal autograd's (one process, dense)."""
    s, t, _ = _data(DS)
    valid = torch.ones(B, dtype=torch.bool)
    u, v = F.normalize(s, dim=1), F.normalize(t, dim=1)
    norms = s.norm(dim=1, keepdim=True)
    proj = torch.eye(DS, dtype=s.dtype)[None] - u[:, :, None] * u[:, None, :]
    for kind, c in (("cosine", 1.0), ("l2", 2.0)):
        x = s.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(embedding_distill_loss(x, t, valid, kind), [x])
        expected = -(c / B) * torch.einsum("bij,bj->bi", proj, v) / norms
        # autograd and the formula, both within GRAD_RTOL of the largest entry
        atol = 2 * GRAD_RTOL * float(expected.abs().max())
        torch.testing.assert_close(g, expected, rtol=0, atol=atol)
    x = s.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(relation_distill_loss(x, x, t, t, valid, valid), [x])
    d_u = (4 / B**2) * (u @ u.T - v @ v.T) @ u
    expected = torch.einsum("bij,bj->bi", proj, d_u) / norms
    atol = 2 * GRAD_RTOL * float(expected.abs().max())
    torch.testing.assert_close(g, expected, rtol=0, atol=atol)


def test_padding_rows_contribute_nothing() -> None:
    s, t, _ = _data(DS)
    valid = torch.ones(B + 2, dtype=torch.bool)
    valid[-2:] = False
    sp = torch.cat([s, torch.randn(2, DS, dtype=s.dtype)])
    tp = torch.cat([t, torch.randn(2, DS, dtype=s.dtype)])
    for kind in ("cosine", "l2"):
        assert embedding_distill_loss(sp, tp, valid, kind).item() == pytest.approx(
            embedding_distill_loss(s, t, valid[:B], kind).item(), rel=0, abs=2 * LOSS_ATOL
        )
    assert relation_distill_loss(sp, sp, tp, tp, valid, valid).item() == pytest.approx(
        relation_distill_loss(s, s, t, t, valid[:B], valid[:B]).item(), rel=0, abs=2 * LOSS_ATOL
    )


def test_bad_inputs_refused() -> None:
    with pytest.raises(ValueError, match="kind"):
        Distiller(4, 4, embedding="l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="teacher embeddings"):
        Distiller(4, 3)(torch.randn(2, 4), torch.randn(2, 4))


def test_distiller_refuses_empty_embeddings() -> None:
    for student_dim, teacher_dim in ((0, 8), (8, 0)):
        with pytest.raises(ValueError, match="embedding sizes must be >= 1"):
            Distiller(student_dim, teacher_dim)
