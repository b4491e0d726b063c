"""Tests for ``backbones``: every registered model, plus registry, precision,
checkpointing, frozen BatchNorm, size counting and the ``--list`` command.

The large models are marked ``slow``; r18, mbf, mbf_tiny and vit_t always run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from backbones.__main__ import main as cli_main
from backbones.flops import PUBLISHED, count_macs, count_parameters
from backbones.norm import FrozenBatchNorm, freeze_batchnorm
from backbones.registry import get_model, list_models

FAST = {"r18", "mbf", "mbf_tiny", "vit_t"}
ALL_MODELS = [
    pytest.param(name, marks=() if name in FAST else pytest.mark.slow, id=name)
    for name in list_models()
]
SIDE = 112
ONNX_SLOW = {"mbf_tiny"}  # same code as mbf, which always runs; export is the slow part
ONNX_MODELS = [
    pytest.param(name, marks=() if name in FAST - ONNX_SLOW else pytest.mark.slow, id=name)
    for name in list_models()
]
# Option tests use small instances: the tiny MobileFaceNet (BatchNorm, PReLU,
# depthwise convs) and a 2-block ViT-T (attention, masking, drop path).
SMALL: dict[str, dict[str, object]] = {"mbf_tiny": {}, "vit_t": {"depth": 2}}
SMALL_IDS = list(SMALL)


def _images(batch: int, seed: int = 0) -> torch.Tensor:
    """Images in [-1, 1], ``(batch, 3, 112, 112)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, SIDE, SIDE, generator=g) * 2 - 1


def _build(name: str, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return get_model(name, **kwargs)


def _calibrate_bn(model: nn.Module, batch: int = 4) -> None:
    """Set every BatchNorm's running statistics to those of one random batch,
    so that eval-mode outputs have a realistic scale (default statistics of an
    untrained deep net give outputs anywhere from 1e-7 to 1e5)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch -> its statistics
    model.train()
    with torch.no_grad():
        model(_images(batch, seed=1))
    model.eval()


# --------------------------------------------------------------------- registry


def test_list_models_has_the_required_names() -> None:
    names = list_models()
    for required in ("r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large"):
        assert required in names
    for required in ("vit_t", "vit_s", "vit_b", "vit_l", "mbf_tiny"):
        assert required in names
    assert len(set(names)) == len(names)


def test_unknown_name_raises_listing_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'r999'") as info:
        get_model("r999")
    for name in list_models():
        assert name in str(info.value)


def test_unknown_keyword_raises() -> None:
    with pytest.raises(TypeError):
        get_model("mbf_tiny", no_such_option=1)


# ------------------------------------------------------- per-model contract


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_shape_dtype_and_finite(name: str) -> None:
    model = _build(name)
    y = model(_images(2))
    assert y.shape == (2, 512)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_backward_reaches_every_parameter(name: str) -> None:
    model = _build(name)
    y = model(_images(2))
    (y * torch.randn_like(y)).sum().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient for {bad}"
    assert sum(float(p.grad.abs().sum()) for _, p in trainable) > 0


@pytest.mark.parametrize("name", ALL_MODELS)
def test_eval_is_deterministic_and_batch_independent(name: str) -> None:
    model = _build(name)
    _calibrate_bn(model)
    x = _images(3)
    with torch.no_grad():
        a, b = model(x), model(x)
        alone = model(x[:1])
    assert torch.equal(a, b)
    torch.testing.assert_close(alone, a[:1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ONNX_MODELS)
def test_onnx_export_matches_eager(name: str, tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _build(name)
    _calibrate_bn(model)
    path = tmp_path / f"{name}.onnx"
    # The call eval/export_onnx.py can reuse: the torch.export-based exporter
    # (default in torch 2.13) at its native opset 18, dynamic batch axis.
    torch.onnx.export(
        model,
        (_images(2),),
        str(path),
        dynamo=True,
        opset_version=18,
        input_names=["input"],
        output_names=["embedding"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
    )
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = _images(batch, seed=batch)
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = session.run(None, {"input": x.numpy()})
        assert got.shape == (batch, 512)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ options


@pytest.mark.parametrize("name", ["r18", *SMALL_IDS])
def test_embedding_size(name: str) -> None:
    model = _build(name, embedding_size=128, **SMALL.get(name, {}))
    assert model(_images(2)).shape == (2, 128)


@pytest.mark.parametrize("name", SMALL_IDS)
def test_autocast_trunk_with_fp32_embedding(name: str) -> None:
    model = _build(name, **SMALL[name])
    _calibrate_bn(model)
    x = _images(2)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.float32
    cos = nn.functional.cosine_similarity(low, ref)
    assert (cos > 0.98).all(), cos


def _train_step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
    torch.manual_seed(2)  # same drop-path / masking draws in both runs
    y = model(x)
    y.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return y.detach(), grads, buffers


@pytest.mark.parametrize("name", SMALL_IDS)
def test_checkpointing_is_exact_and_saves_memory(name: str) -> None:
    x = _images(2)
    plain = _train_step(_build(name, **SMALL[name]), x)
    model = _build(name, checkpoint=True, **SMALL[name])
    assert model.checkpoint and not _build(name, **SMALL[name]).checkpoint  # per instance
    ckpt = _train_step(model, x)
    torch.testing.assert_close(ckpt[0], plain[0], rtol=0, atol=0)
    assert ckpt[1].keys() == plain[1].keys()
    for k in plain[1]:
        # recomputation repeats the same CPU operations: bitwise equal gradients
        torch.testing.assert_close(ckpt[1][k], plain[1][k], rtol=0, atol=0, msg=k)
    # BatchNorm running statistics are updated once, not again on recomputation.
    for k in plain[2]:
        torch.testing.assert_close(ckpt[2][k], plain[2][k], rtol=0, atol=0, msg=k)

    def saved_bytes(m: nn.Module) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(x)
        return total

    assert saved_bytes(model) < 0.7 * saved_bytes(_build(name, **SMALL[name]))


@pytest.mark.parametrize("name", SMALL_IDS)
def test_freeze_bn_makes_training_outputs_batch_independent(name: str) -> None:
    model = _build(name, **SMALL[name])
    _calibrate_bn(model)
    with torch.no_grad():
        reference = model(_images(3))  # eval mode, running statistics
    frozen = freeze_batchnorm(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in frozen.modules())
    frozen.train()
    if hasattr(frozen, "mask_ratio"):
        frozen.mask_ratio = 0.0
    for m in frozen.modules():  # no stochastic layers for this comparison
        if hasattr(m, "p") and isinstance(m.p, float):
            m.p = 0.0
    x = _images(3)
    y = frozen(x)
    torch.testing.assert_close(y, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(frozen(x[:1]), y[:1], rtol=1e-4, atol=1e-4)
    y.sum().backward()
    frozen_bns = [m for m in frozen.modules() if isinstance(m, FrozenBatchNorm)]
    assert frozen_bns and all(m.bias.grad is not None for m in frozen_bns)


def test_get_model_freeze_bn_flag() -> None:
    model = get_model("mbf_tiny", freeze_bn=True)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_vit_token_masking_only_in_training() -> None:
    model = _build("vit_t", mask_ratio=0.5, **SMALL["vit_t"])
    seen: list[int] = []
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    model(_images(2))
    model.eval()
    with torch.no_grad():
        model(_images(2))
    assert seen == [72, 144]


def test_mbf_width_mult_gives_a_small_fast_model() -> None:
    tiny = get_model("mbf", width_mult=0.25, depthwise_stage0=True)  # = mbf_tiny
    assert count_parameters(tiny) == count_parameters(get_model("mbf_tiny"))
    assert count_parameters(tiny) < 0.3e6
    assert count_macs(tiny) < 40e6


# -------------------------------------------------------------------- sizes

SIZE_CHECKS = [
    pytest.param(name, marks=pytest.mark.slow if name in ("r100", "r200") else (), id=name)
    for name in PUBLISHED
]


@pytest.mark.parametrize("name", SIZE_CHECKS)
def test_parameter_count_matches_published(name: str) -> None:
    published, _ = PUBLISHED[name]
    assert published is not None
    measured = count_parameters(get_model(name)) / 1e6
    # The published figure is rounded to its last printed digit: half a unit of it.
    decimals = len(repr(published).partition(".")[2])
    assert measured == pytest.approx(published, rel=0, abs=0.5 * 10.0**-decimals)


@pytest.mark.parametrize(
    "name", ["mbf", "r50", pytest.param("r100", marks=pytest.mark.slow, id="r100")]
)
def test_macs_match_published_gflops(name: str) -> None:
    _, published = PUBLISHED[name]
    assert published is not None
    measured = count_macs(get_model(name)) / 1e9
    # Published figures also count BN/PReLU/additions (a few percent for mbf).
    assert measured == pytest.approx(published, rel=0.05)


def test_cli_lists_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["--list", "mbf", "mbf_tiny"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[0] == "model"
    row = out[1].split()
    assert row[0] == "mbf" and row[1] == "2.06" and row[-2:] == ["2.06", "0.45"]
    assert out[2].split()[0] == "mbf_tiny"


def test_cli_rejects_unknown_model() -> None:
    with pytest.raises(SystemExit):
        cli_main(["--list", "nope"])
