"""The logit distillation term (:func:`partial_fc.distill.logit_distill_loss`, the
``logit`` term of :class:`~partial_fc.distill.Distiller`) against a dense float64
reference (the full C-wide softmax over the concatenated centres of all ranks) on 1-3
gloo ranks with ragged batches (a rank may hold no row) and uneven class shards, in
fp32 and float64; its world-size invariance, inert padding, the gradient stated in its
docstring, refusals, and no host sync."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from partial_fc.distill import Distiller, logit_distill_loss
from partial_fc.sharding import class_range
from tests.dispatch_count import DispatchCounter
from tests.distributed import run_ranks

U64 = 2.0**-53  # float64 unit roundoff
U32 = 2.0**-24  # float32 unit roundoff

B, D, C, SCALE = 7, 5, 11, 16.0  # 11 classes: shards 6+5 on 2 ranks, 4+4+3 on 3
SIZES = {1: [7], 2: [5, 2], 3: [3, 0, 4]}
DTYPES = (torch.float32, torch.float64)
CASES = [
    (temperature, k, pad)
    for temperature in (1.0, 4.0)
    for k in (1, 2)  # one centre per class, two sub-centres (max over them)
    for pad in (False, True)  # pad: max_local_batch (no size exchange), 2 classes a block
]


def _unit_roundoff(dtype: torch.dtype) -> float:
    return U32 if dtype == torch.float32 else U64


def _value_tol(temperature: float, u: float) -> float:
    """Absolute error bound of the loss computed with unit roundoff ``u``."""
    a = SCALE / temperature
    # A logit a * cos: two normalisations and a D-term dot of unit vectors, then * a.
    eps_z = a * (2 * D + 7) * u
    # Softmax arithmetic: C-term sums of exp, chunk rescales, a <= 3-rank all-reduce,
    # exp/log/division roundings (n_sum roundings, relative), and |M| + log S <= a + 3.
    n_sum = C + 12 + a
    # KL moves by |p_s - p_t|_1 <= 2 plus max |d - E d| <= 4a (d = z_t - z_s) per unit
    # logit error; the sums err relatively on terms of size <= 2a (cross) and 1 (logs).
    return temperature**2 * (4 * a + 2) * (eps_z + n_sum * u)


def _grad_tol(temperature: float, u: float, min_norm: float, grad_max: float) -> float:
    """Elementwise absolute error bound of ``dL/ds`` computed with unit roundoff ``u``."""
    a = SCALE / temperature
    eps_z = a * (2 * D + 7) * u
    n_sum = C + 12 + a
    # p = exp(z - lse): relative error <= 2 eps_z + 2 n_sum u, so sum_c |dp| is too, for
    # p_s and p_t; the C-term product with unit centres adds (C + D + 4) u, both sides.
    d_u = (SCALE * temperature / B) * (4 * eps_z + 4 * n_sum * u + 2 * (C + D + 4) * u)
    # (I - u u^T) / |s| maps an entrywise error e to at most (1 + D) e / |s|, and its own
    # roundings (a D-term dot, the norm) err by (2 D + 8) u relative to the gradient.
    return (1 + D) * d_u / min_norm + (2 * D + 8) * u * grad_max


def _data(dtype: torch.dtype, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student rows, teacher rows and all ``C * K`` centres, rounded to ``dtype``."""
    g = torch.Generator().manual_seed(5)
    s = torch.randn(B, D, generator=g, dtype=torch.float64)
    t = torch.randn(B, D, generator=g, dtype=torch.float64)
    w = torch.randn(C * k, D, generator=g, dtype=torch.float64)
    return s.to(dtype), t.to(dtype), w.to(dtype)


def _dense_kl(
    s: torch.Tensor, t: torch.Tensor, w: torch.Tensor, temperature: float, k: int
) -> torch.Tensor:
    """float64, the full (B, C) softmax: T^2 * mean_i KL(p_t,i || p_s,i)."""
    wn = F.normalize(w.double(), dim=1)
    zs = (F.normalize(s, dim=1) @ wn.T).view(s.shape[0], C, k).amax(dim=2) * SCALE / temperature
    zt = (F.normalize(t.double(), dim=1) @ wn.T).view(s.shape[0], C, k).amax(dim=2)
    zt = zt * SCALE / temperature
    kl = (F.softmax(zt, dim=1) * (F.log_softmax(zt, dim=1) - F.log_softmax(zs, dim=1))).sum(1)
    return temperature**2 * kl.mean()


def _reference(dtype: torch.dtype, temperature: float, k: int) -> tuple[float, torch.Tensor]:
    """The dense float64 value and gradient w.r.t. the student rows, from the same
    (``dtype``-rounded) inputs."""
    s, t, w = _data(dtype, k)
    x = s.double().requires_grad_(True)
    loss = _dense_kl(x, t, w, temperature, k)
    (g,) = torch.autograd.grad(loss, [x])
    return loss.item(), g


def _rank_fn(rank: int, world_size: int) -> list:
    sizes = SIZES[world_size]
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    class_start, num_local = class_range(C, rank, world_size)
    results = []
    for dtype in DTYPES:
        for temperature, k, pad in CASES:
            s, t, w = _data(dtype, k)
            shard = w[class_start * k : (class_start + num_local) * k].clone()
            shard.requires_grad_(True)  # used detached: no gradient may reach it
            distiller = Distiller(
                D,
                D,
                embedding=None,
                relation=False,
                max_local_batch=max(sizes) if pad else None,
                logit=True,
                logit_scale=SCALE,
                temperature=temperature,
                num_subcenters=k,
                chunk_classes=2 if pad else None,
            )
            local_s = s[rows].clone().requires_grad_(True)
            counter = DispatchCounter()
            with counter:
                value = distiller(local_s, t[rows], class_centres=shard)["logit"]
                value.backward()
            same_s = s[rows].clone().requires_grad_(True)
            same = distiller(same_s, same_s.detach().clone(), class_centres=shard)["logit"]
            same.backward()
            results.append(
                (
                    (dtype, temperature, k, pad),
                    value.detach(),
                    local_s.grad,
                    counter.host_syncs,
                    shard.grad is None,
                    same.detach(),
                    same_s.grad,
                )
            )
    return results


@pytest.fixture(scope="module")
def per_world_size() -> dict[int, list]:
    return {ws: run_ranks(_rank_fn, ws) for ws in (1, 2, 3)}


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_value_and_gradient_match_dense_reference(per_world_size, world_size: int) -> None:
    sizes = SIZES[world_size]
    for rank, rank_results in enumerate(per_world_size[world_size]):
        start = sum(sizes[:rank])
        for (dtype, temperature, k, pad), value, grad, _, centres_untouched, *_ in rank_results:
            where = f"{dtype} T={temperature} K={k} pad={pad} rank {rank}/{world_size}"
            ref_value, ref_grad = _reference(dtype, temperature, k)
            u = _unit_roundoff(dtype)
            assert value.dtype == dtype, where
            assert abs(value.item() - ref_value) <= _value_tol(temperature, u), where
            s = _data(dtype, k)[0].double()
            atol = _grad_tol(
                temperature, u, float(s.norm(dim=1).min()), float(ref_grad.abs().max())
            )
            assert grad.dtype == dtype, where
            torch.testing.assert_close(
                grad.double(), ref_grad[start : start + sizes[rank]], rtol=0, atol=atol, msg=where
            )
            assert centres_untouched, where


def test_world_size_invariant(per_world_size) -> None:
    """The same global batch split over 1, 2 or 3 ranks (and the classes over as many
    shards) gives the same value on every rank and the same gradient for every row."""
    for index, (dtype, temperature, k, _) in enumerate(
        [(dt, *case) for dt in DTYPES for case in CASES]
    ):
        u = _unit_roundoff(dtype)
        _, ref_grad = _reference(dtype, temperature, k)
        s = _data(dtype, k)[0].double()
        grad_tol = _grad_tol(
            temperature, u, float(s.norm(dim=1).min()), float(ref_grad.abs().max())
        )
        first = per_world_size[1][0][index]
        for ws in (2, 3):
            results = per_world_size[ws]
            values = [r[index][1].item() for r in results]
            # all-reduced statistics: every rank computes the identical value
            assert len(set(values)) == 1, (ws, values)
            # both sides are within the bound of the reference
            assert abs(values[0] - first[1].item()) <= 2 * _value_tol(temperature, u), ws
            grads = torch.cat([r[index][2] for r in results])
            torch.testing.assert_close(grads, first[2], rtol=0, atol=2 * grad_tol)


def test_zero_when_teacher_equals_student(per_world_size) -> None:
    """t == s gives bit-identical logits on every rank. On one rank the value and the
    gradient are exactly 0; on several, the all-reduce may add the student's and the
    teacher's sums of exponentials in different orders (a ring reduces each segment
    from another rank), which leaves a rounding-level lse_s - lse_t."""
    for ws, results in per_world_size.items():
        for rank_results in results:
            for case, *_, same, same_grad in rank_results:
                dtype, temperature = case[0], case[1]
                if ws == 1:
                    assert same.item() == 0.0, case
                    assert torch.count_nonzero(same_grad).item() == 0, case
                    continue
                u, a = _unit_roundoff(dtype), SCALE / temperature
                s_min = float(_data(dtype, 1)[0].double().norm(dim=1).min())
                # S_s, S_t: ws-term sums in two orders (2 (ws - 1) u relative apart); the
                # two logs and M + log S round at |lse| <= a + log C (+1 for the log).
                delta = (2 * (ws - 1) + 4 * (a + math.log(C) + 1)) * u
                # E_pt[z_t - z_s] is exactly 0: the value is T^2 (lse_s - lse_t).
                assert abs(same.item()) <= temperature**2 * delta, (ws, case)
                # p_s - p_t = p_s (1 - exp(lse_s - lse_t)): sum_c |.| <= 2 delta, through
                # (I - u u^T) / |s| as in _grad_tol.
                grad_tol = (1 + D) * (SCALE * temperature / B) * 2 * delta / s_min
                assert bool((same_grad.abs() <= grad_tol).all()), (ws, case)


def test_no_host_sync_with_max_local_batch(per_world_size) -> None:
    """Forward and backward dispatch nothing that would wait for a GPU when every rank
    pads to ``max_local_batch`` (and on one rank in any case)."""
    for ws, results in per_world_size.items():
        for rank_results in results:
            for case, _, _, syncs, *_ in rank_results:
                if case[3] or ws == 1:
                    assert syncs == [], (ws, case, syncs)


@pytest.mark.parametrize("chunk", [None, 3])
def test_docstring_gradient_and_padding(chunk: int | None) -> None:
    """One process, float64: the gradient written in the docstring equals autograd's;
    padding rows (junk values, valid False) change nothing and get a zero gradient;
    neither the teacher nor the centres get one."""
    k, temperature = 2, 4.0
    s, t, w = _data(torch.float64, k)
    junk = torch.randn(2, D, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    valid = torch.cat([torch.ones(B, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)])
    x = torch.cat([s, junk]).requires_grad_(True)
    teacher = torch.cat([t, -junk]).requires_grad_(True)
    centres = w.clone().requires_grad_(True)
    kwargs = {"scale": SCALE, "temperature": temperature, "num_subcenters": k}
    loss = logit_distill_loss(x, teacher, centres, valid, chunk_classes=chunk, **kwargs)
    loss.backward()
    assert teacher.grad is None and centres.grad is None
    ref_value, ref_grad = _reference(torch.float64, temperature, k)
    # float64 on both sides: the float64 bounds of the fp32 cases
    assert abs(loss.item() - ref_value) <= _value_tol(temperature, U64)
    atol = _grad_tol(temperature, U64, float(s.norm(dim=1).min()), float(ref_grad.abs().max()))
    torch.testing.assert_close(x.grad[:B], ref_grad, rtol=0, atol=atol)
    assert torch.count_nonzero(x.grad[B:]).item() == 0
    # The docstring's formula: dL/du_i = (scale T / B) sum_c (p_s - p_t) W^_c*, then
    # dL/ds_i = (I - u u^T) dL/du_i / |s_i|.
    a = SCALE / temperature
    un, vn, wn = F.normalize(s, dim=1), F.normalize(t, dim=1), F.normalize(w, dim=1)
    cos_s = (un @ wn.T).view(B, C, k).max(dim=2)
    cos_t = (vn @ wn.T).view(B, C, k).amax(dim=2)
    diff = F.softmax(a * cos_s.values, dim=1) - F.softmax(a * cos_t, dim=1)
    winners = wn.view(C, k, D)[torch.arange(C)[None, :], cos_s.indices]  # (B, C, D)
    d_u = (SCALE * temperature / B) * torch.einsum("bc,bcd->bd", diff, winners)
    proj = torch.eye(D, dtype=s.dtype)[None] - un[:, :, None] * un[:, None, :]
    expected = torch.einsum("bij,bj->bi", proj, d_u) / s.norm(dim=1, keepdim=True)
    torch.testing.assert_close(x.grad[:B], expected, rtol=0, atol=2 * atol)


def test_empty_global_batch_is_zero() -> None:
    s = torch.zeros(0, D, requires_grad=True)
    loss = logit_distill_loss(
        s, torch.zeros(0, D), torch.randn(C, D), torch.zeros(0, dtype=torch.bool), scale=SCALE
    )
    loss.backward()
    assert loss.item() == 0.0 and s.grad.shape == (0, D)


def test_bad_inputs_refused() -> None:
    with pytest.raises(ValueError, match=r"teacher's embedding size \(3\).*student's \(5\)"):
        Distiller(5, 3, embedding=None, relation=False, logit=True)
    x, valid = torch.randn(4, 5), torch.ones(4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"teacher's embedding size \(3\).*student's \(5\)"):
        logit_distill_loss(x, torch.randn(4, 3), torch.randn(6, 5), valid, scale=SCALE)
    with pytest.raises(ValueError, match="centres have embedding size 4, the student 5"):
        logit_distill_loss(x, x, torch.randn(6, 4), valid, scale=SCALE)
    with pytest.raises(ValueError, match="not a multiple of num_subcenters=4"):
        logit_distill_loss(x, x, torch.randn(6, 5), valid, scale=SCALE, num_subcenters=4)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature"):
            logit_distill_loss(x, x, torch.randn(6, 5), valid, scale=SCALE, temperature=bad)
        with pytest.raises(ValueError, match="temperature"):
            Distiller(5, 5, logit=True, temperature=bad)
    with pytest.raises(ValueError, match="class_centres"):
        Distiller(5, 5, embedding=None, relation=False, logit=True)(x, x)
