"""The triton backend of the head (partial_fc/triton_ce.py) equals the dense float64
reference: loss, embedding and weight gradients and accuracy on 1-3 gloo ranks, for
ArcFace, CosFace, combined margins, sampling (sparse COO gradient), ragged and padded
batches, several forward splits, both embedding-gradient layouts, bf16 products and the
batch-aware margins that leave the non-target logits alone (AdaFace, MagFace).

On the CPU the kernels run in Triton's interpreter: ``TRITON_INTERPRET=1`` is set for
this module's tests only (a fixture), before triton is first imported (the head imports
the kernel module lazily; the gloo ranks are fresh processes that inherit the variable).
Tiles of 16 make every kernel walk several tiles and a ragged last one. With
``pytest --device cuda`` the same tests run the compiled kernels.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from functools import partial
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from partial_fc import ArcFace, CombinedMargin, CosFace, CurricularFace, PartialFC
from partial_fc.sharding import class_range
from tests.dispatch_count import DispatchCounter
from tests.distributed import TEST_DEVICE_ENV, device_under_test, run_ranks
from tests.head_reference import MarginSpec, dense_loss

if importlib.util.find_spec("triton") is None:  # found, not imported: see _interpreter
    pytest.skip("the triton backend needs the triton package", allow_module_level=True)

pytestmark = pytest.mark.on_device

DIM = 20  # not a power of two: the kernels mask the embedding dimension too
BATCH_SIZES = {1: [21], 2: [13, 6], 3: [9, 0, 14]}  # B 19-23: two row tiles of 16
SMALL = dict(block_b=16, block_c=16, grad_block_c=16, grad_block_b=16)


@pytest.fixture(autouse=True, scope="module")
def _interpreter() -> Iterator[None]:
    """On the CPU: Triton's interpreter (``TRITON_INTERPRET=1``) for this module's tests
    and the ranks they spawn, which inherit the environment; put back afterwards."""
    if not _interpret():
        yield
        return
    with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1"}):
        yield


def _interpret() -> bool:
    return os.environ.get(TEST_DEVICE_ENV, "cpu") == "cpu"


def _tiles(**changes):
    from partial_fc.triton_ce import TritonTiles

    return TritonTiles(**{**SMALL, **changes})


# name -> (the head's margin, the reference's MarginSpec)
MARGINS = {
    "arcface": (lambda: ArcFace(64.0, 0.5), MarginSpec(64.0, m2=0.5)),
    "cosface": (lambda: CosFace(64.0, 0.35), MarginSpec(64.0, m2=0.0, m3=0.35)),
    "combined": (
        lambda: CombinedMargin(32.0, 1.2, 0.3, 0.2),
        MarginSpec(32.0, m1=1.2, m2=0.3, m3=0.2),
    ),
}

# Each case: margin, classes, sample rate, products, tile changes, padding, ignore_index.
CASES = [
    dict(name="arcface", classes=70, ignore=True),
    dict(name="cosface", classes=53, tiles=dict(splits=2)),
    dict(name="combined", classes=61, tiles=dict(dx_in_forward=False), pad=True),
    dict(name="arcface", classes=90, rate=0.5, tiles=dict(splits=3)),
    dict(name="combined", classes=47, rate=0.5, tiles=dict(dx_in_forward=False)),
    dict(name="arcface", classes=70, matmul="bf16"),
]


def _case_data(case: dict, world_size: int, seed: int):
    """Global data, rounded to fp32 (the head's dtype) and returned in float64 for the
    reference: embeddings near, far from and opposite their centres (every margin
    branch), of norms 1 to 10."""
    g = torch.Generator().manual_seed(seed)
    batch = sum(BATCH_SIZES[world_size])
    weight = torch.randn(case["classes"], DIM, generator=g, dtype=torch.float64)
    labels = torch.randint(0, case["classes"], (batch,), generator=g)
    pull = torch.tensor([1.0, 0.0, -1.0, 0.6, -0.8])[torch.arange(batch) % 5].double()
    centre = weight[labels] / weight[labels].norm(dim=1, keepdim=True)
    noise = 0.3 * torch.randn(batch, DIM, generator=g, dtype=torch.float64)
    norms = torch.linspace(1.0, 10.0, batch, dtype=torch.float64)[:, None]
    embeddings = norms * (pull[:, None] * centre + noise)
    if case.get("ignore"):
        labels[1] = -1
    return embeddings.float().double(), weight.float().double(), labels


def _run_case(rank: int, world_size: int, case: dict, seed: int) -> dict:
    embeddings, weight, labels = _case_data(case, world_size, seed)
    device = device_under_test()
    sizes = BATCH_SIZES[world_size]
    lo = sum(sizes[:rank])
    head = PartialFC(
        case["classes"], DIM, MARGINS[case["name"]][0](), sample_rate=case.get("rate", 1.0),
        ignore_index=-1 if case.get("ignore") else None,
        max_local_batch=max(sizes) if case.get("pad") else None,
        matmul_dtype=torch.bfloat16 if case.get("matmul") == "bf16" else None,
        backend="triton", triton_tiles=_tiles(**case.get("tiles", {})), device=device,
    )  # fmt: skip
    with torch.no_grad():
        head.weight.copy_(weight[head.class_start : head.class_start + head.num_local])
    local = embeddings[lo : lo + sizes[rank]].float().to(device).requires_grad_(True)
    loss = head(local, labels[lo : lo + sizes[rank]].to(device))
    loss.backward()
    grad = head.weight.grad
    sampled = head.last_sampled
    return dict(
        loss=loss.detach().double().cpu(),
        grad_embeddings=local.grad.double().cpu(),
        grad_weight=grad.to_dense().double().cpu(),
        sparse=grad.layout == torch.sparse_coo,
        coalesced=grad.layout == torch.sparse_coo and grad.is_coalesced(),
        grad_rows=grad._indices()[0].cpu() if grad.layout == torch.sparse_coo else None,
        sampled=None if sampled is None else (sampled + head.class_start).cpu(),
        accuracy=float(head.accuracy),
        class_start=head.class_start,
    )


def _run_cases(rank: int, world_size: int) -> list[dict]:
    out = [_run_case(rank, world_size, case, seed) for seed, case in enumerate(CASES)]
    if world_size == 2:
        out += [_run_batch_margin(rank, world_size, name) for name in BATCH_MARGINS]
    return out


def _check_case(case: dict, seed: int, world_size: int, per_rank: list[dict]) -> None:
    embeddings, weight, labels = _case_data(case, world_size, seed)
    embeddings.requires_grad_(True)
    weight.requires_grad_(True)
    classes = None
    if case.get("rate", 1.0) < 1.0:
        classes = torch.cat([got["sampled"] for got in per_rank])
        sampled_rows = [got["sampled"] - got["class_start"] for got in per_rank]
        for got, rows in zip(per_rank, sampled_rows, strict=True):
            # The sampled step's contract: a coalesced COO gradient of the sampled rows.
            assert got["sparse"] and got["coalesced"], case
            assert torch.equal(got["grad_rows"], rows), case
    ignore = -1 if case.get("ignore") else None
    loss, correct = dense_loss(
        embeddings, weight, labels, MARGINS[case["name"]][1], 1, ignore, classes
    )
    loss.backward()
    keep = labels != -1
    bf16 = case.get("matmul") == "bf16"
    where = f"{case} W={world_size}"
    sizes = BATCH_SIZES[world_size]
    for rank, got in enumerate(per_rank):
        start, count = class_range(case["classes"], rank, world_size)
        lo = sum(sizes[:rank])
        want = [
            ("loss", got["loss"], loss.detach()),
            ("embedding grad", got["grad_embeddings"], embeddings.grad[lo : lo + sizes[rank]]),
            ("weight grad", got["grad_weight"], weight.grad[start : start + count]),
        ]
        for what, have, ref in want:
            if bf16:
                # bf16 operands keep ~3 significant digits of each cosine (logits x 64).
                error = torch.linalg.vector_norm(have - ref)
                assert error <= 0.03 * torch.linalg.vector_norm(ref) + 1e-6, (what, where)
            else:
                torch.testing.assert_close(
                    have, ref, rtol=1e-5, atol=1e-5, msg=f"{what}, rank {rank}, {where}"
                )
        if not bf16:
            expected = float(correct[keep].double().mean())
            assert got["accuracy"] == pytest.approx(expected), where


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_triton_head_matches_dense_reference(world_size: int) -> None:
    results = run_ranks(_run_cases, world_size)
    for seed, case in enumerate(CASES):
        _check_case(case, seed, world_size, [results[r][seed] for r in range(world_size)])
    if world_size == 2:
        for i, name in enumerate(BATCH_MARGINS, start=len(CASES)):
            _check_batch_margin(name, [results[r][i] for r in range(world_size)])


# ---------------------------------------------------- batch-aware margins (target only)
BATCH_MARGINS = ("adaface", "magface")
BM_STEPS = 2


def _run_batch_margin(rank: int, world_size: int, name: str) -> dict:
    from tests.partial_fc.test_batch_margins import BATCHES, CLASSES, _global_batch, _margin
    from tests.partial_fc.test_batch_margins import DIM as BM_DIM

    sizes = BATCHES[world_size]
    head = PartialFC(
        CLASSES, BM_DIM, _margin(name), sample_rate=0.5, seed=5, backend="triton",
        triton_tiles=_tiles(), device=device_under_test(),
    )  # fmt: skip
    lo = sum(sizes[:rank])
    steps = []
    for step in range(BM_STEPS):
        x, y = _global_batch(step, sum(sizes))
        local = x[lo : lo + sizes[rank]].float().to(head.weight.device).requires_grad_(True)
        weight = head.weight.detach().double().cpu()
        loss = head(local, y[lo : lo + sizes[rank]].to(head.weight.device))
        loss.backward()
        steps.append(
            dict(
                loss=loss.detach().double().cpu(),
                x_grad=local.grad.double().cpu(),
                w_grad=head.weight.grad.to_dense().double().cpu(),
                weight=weight,
                sampled=(head.last_sampled + head.class_start).cpu(),
            )
        )
        head.weight.grad = None
    return dict(steps=steps)


def _check_batch_margin(name: str, per_rank: list[dict]) -> None:
    from tests.partial_fc.test_batch_margins import BATCHES, _global_batch, _reference_step

    state = {"mean": torch.tensor(20.0, dtype=torch.float64),
             "std": torch.tensor(100.0, dtype=torch.float64),
             "t": torch.tensor(0.0, dtype=torch.float64)}  # fmt: skip
    sizes = BATCHES[len(per_rank)]
    for step in range(BM_STEPS):
        got = [r["steps"][step] for r in per_rank]
        x, y = _global_batch(step, sum(sizes))
        x = x.float().double()  # the head's fp32 input
        weight = torch.cat([g["weight"] for g in got])
        classes = torch.sort(torch.cat([g["sampled"] for g in got])).values
        loss, x_grad, w_grad = _reference_step(name, state, x, y, weight, 1, classes, None)
        where = f"{name} step {step}"
        for g in got:
            torch.testing.assert_close(g["loss"], loss, rtol=1e-5, atol=1e-5, msg=where)
        torch.testing.assert_close(
            torch.cat([g["x_grad"] for g in got]), x_grad, rtol=1e-4, atol=1e-6, msg=where
        )
        torch.testing.assert_close(
            torch.cat([g["w_grad"] for g in got]), w_grad, rtol=1e-4, atol=1e-5, msg=where
        )


# ------------------------------------------------------------- in-process properties
def _step(head: PartialFC, batch: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    device = head.weight.device
    x = torch.randn(batch, head.embedding_size, generator=g).to(device).requires_grad_(True)
    y = torch.randint(0, head.num_classes, (batch,), generator=g).to(device)
    head(x, y).backward()


class _Largest(TorchDispatchMode):
    """Records the largest tensor an operator allocates (outputs sharing an input's
    storage, as in-place ops and the interpreter's argument copies, allocate nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    @staticmethod
    def _dense(t: torch.Tensor) -> torch.Tensor:
        return t._values() if t.layout == torch.sparse_coo else t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        inputs = {
            self._dense(t).untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                t = self._dense(t)
                if t.untyped_storage().data_ptr() not in inputs:
                    self.numel = max(self.numel, t.numel())
        return out


STEP_BATCH, STEP_CLASSES = 24, 90  # B x S = 2160 > S x D = 1800; sampled: 1080 > 900


def _fresh_process_checks(rank: int, world_size: int) -> dict:
    """Kernels launched in a fresh process (here, in the test process, an earlier test
    may have imported triton without the interpreter: the ONNX exporter does)."""
    from partial_fc import triton_ce

    device = device_under_test()
    out: dict = {"steps": []}
    for rate in (1.0, 0.5):
        head = PartialFC(
            STEP_CLASSES, DIM, ArcFace(), sample_rate=rate, max_local_batch=STEP_BATCH,
            backend="triton", triton_tiles=_tiles(splits=2), device=device,
        )  # fmt: skip
        _step(head, STEP_BATCH)  # the first launch (compilation) outside the count
        head.weight.grad = None
        largest = _Largest()
        with DispatchCounter() as counter, largest:
            _step(head, STEP_BATCH, seed=1)
        used = STEP_CLASSES if head.last_sampled is None else head.last_sampled.numel()
        out["steps"].append(dict(rate=rate, used=used, syncs=counter.host_syncs,
                                 largest=largest.numel))  # fmt: skip
    # The torch backend does allocate a (B, chunk) block: the check can fail.
    largest = _Largest()
    with largest:
        _step(PartialFC(STEP_CLASSES, DIM, ArcFace(), backend="torch", device=device), STEP_BATCH)
    out["torch_largest"] = largest.numel
    check = partial(triton_ce.self_test, device, torch.float32, DIM, tiles=_tiles())
    out["self_test"] = [check(None), check(torch.bfloat16)]
    real = triton_ce.inverse_norms
    with mock.patch.object(triton_ce, "inverse_norms", lambda w, s: real(w, s) * 1.01):
        out["self_test_off_by_1pc"] = check(None)
    with mock.patch.object(triton_ce, "_forward_kernel", None):  # a launch that fails
        out["self_test_broken"] = check(None)
    return out


@pytest.fixture(scope="module")
def fresh_process() -> dict:
    return run_ranks(_fresh_process_checks, 1)[0]


def test_no_logits_block_and_no_host_sync(fresh_process: dict) -> None:
    """No operator of a triton step (sampled or not) allocates a tensor of B x S elements
    or more (the weight gradient, S x D, is the largest), and none would make a GPU wait."""
    for step in fresh_process["steps"]:
        assert step["syncs"] == [], step
        assert step["used"] * DIM <= step["largest"] < STEP_BATCH * step["used"], step
    assert fresh_process["torch_largest"] >= STEP_BATCH * STEP_CLASSES


def test_self_test_passes_and_catches_wrong_numbers(fresh_process: dict) -> None:
    assert fresh_process["self_test"] == [None, None]  # fp32 and bf16 products
    problem = fresh_process["self_test_off_by_1pc"]
    assert problem is not None and "off by" in problem
    problem = fresh_process["self_test_broken"]
    assert problem is not None and problem.startswith("TypeError")


def test_unsupported_options_refuse_triton_and_auto_falls_back(device: torch.device) -> None:
    for kwargs, fragment in (
        (dict(num_subcenters=2), "sub-centres"),
        (dict(interclass_filtering_threshold=0.3), "inter-class filtering"),
        (dict(margin=CurricularFace()), "CurricularFace"),
        (dict(dtype=torch.float64), "float64"),
    ):
        margin = kwargs.pop("margin", ArcFace())
        with pytest.raises(
            ValueError, match=f"backend='triton' cannot run this head: .*{fragment}"
        ):
            PartialFC(20, DIM, margin, backend="triton", device=device, **kwargs)
        head = PartialFC(20, DIM, margin, backend="auto", device=device, **kwargs)
        assert head.active_backend == "torch", kwargs
    # "auto" on the CPU always picks torch; on CUDA, triton for 16-bit products only.
    for matmul_dtype in (None, torch.bfloat16):
        head = PartialFC(20, DIM, ArcFace(), backend="auto", matmul_dtype=matmul_dtype,
                         device=device)  # fmt: skip
        cuda_pick = "triton" if matmul_dtype is not None else "torch"
        assert head.active_backend == (cuda_pick if device.type == "cuda" else "torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        PartialFC(20, DIM, ArcFace(), backend="cuda")  # type: ignore[arg-type]


def test_triton_without_a_gpu_or_interpreter_fails_at_construction() -> None:
    with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "0"}):
        with pytest.raises(ValueError, match="backend='triton' needs the weight on a CUDA"):
            PartialFC(20, DIM, ArcFace(), backend="triton", device="cpu")


def test_missing_triton_fails_at_start_up_naming_the_option() -> None:
    from configs import ConfigError
    from configs.schema import HeadConfig

    why = "triton is not importable (No module named 'triton')"
    with (
        mock.patch("partial_fc.backend.triton_missing", return_value=why),
        mock.patch("partial_fc.head.triton_missing", return_value=why),
    ):
        with pytest.raises(ConfigError, match=r"head\.backend=triton: triton is not importable"):
            HeadConfig(backend="triton").validate()
        with pytest.raises(ValueError, match="backend='triton' cannot run this head: triton is"):
            PartialFC(20, DIM, ArcFace(), backend="triton")
        HeadConfig(backend="auto").validate()  # auto never needs it
        assert PartialFC(20, DIM, ArcFace(), backend="auto").active_backend == "torch"
    with pytest.raises(ConfigError, match=r"head\.backend=triton: sub-centres"):
        HeadConfig(backend="triton", num_subcenters=3).validate()
    with pytest.raises(ConfigError, match=r"head\.backend=triton: CurricularFace"):
        HeadConfig(backend="triton", loss="curricular").validate()
    with pytest.raises(ConfigError, match=r"head\.backend: must be one of auto, torch, triton"):
        HeadConfig(backend="cuda").validate()  # type: ignore[arg-type]


def test_tiles_are_validated() -> None:
    from partial_fc.triton_ce import TritonTiles, default_tiles

    with pytest.raises(ValueError, match="block_c must be a power of two >= 16, got 24"):
        TritonTiles(block_c=24)
    with pytest.raises(ValueError, match="splits must be >= 1"):
        TritonTiles(splits=0)
    for dim, dtype in ((512, torch.bfloat16), (512, torch.float32), (64, torch.float16)):
        assert isinstance(default_tiles(dim, dtype), TritonTiles)  # valid by construction


def test_kernels_compile_for_an_h100_within_its_shared_memory() -> None:
    """The compiled (not interpreted) kernels build for sm_90 with the default tiles at
    D 512, bf16 products, sampled or not, and each block fits in an SM's shared memory:
    what the interpreter cannot check. ptxas runs here, no GPU needed (a fresh process:
    this one may hold interpreted kernels)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import json, torch\n"
        "from partial_fc import triton_ce\n"
        "print(json.dumps(triton_ce.compile_report(512, torch.bfloat16)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9's default, without its warning
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True
    )
    if done.returncode != 0 and "cuobjdump" in done.stderr and "No such file" in done.stderr:
        pytest.skip("this triton install ships no cuobjdump")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    from partial_fc.triton_ce import SM90_SHARED_BYTES

    assert set(report) == {
        "inverse_norms", "forward", "forward_sampled", "weight_grad", "weight_grad_sampled"
    }  # fmt: skip
    for kernel, usage in report.items():
        assert 0 < usage["registers"] <= 255, (kernel, usage)
        assert usage["shared_bytes"] <= SM90_SHARED_BYTES, (kernel, usage)
