"""arcface_torch state-dict compatibility of the backbones and the weight files of
:mod:`backbones.weights`.

References, none of them our model code:

* ``tests/data/arcface_torch_keys/<name>.txt``: arcface_torch's ``state_dict`` keys and
  shapes, built by ``make_keys.py`` there from facts read in its ``backbones/``;
* a functional forward (``torch.nn.functional`` on the state dict, by arcface_torch's
  key names and architecture facts, in float64) for the embedding checks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backbones.norm import freeze_batchnorm
from backbones.registry import get_model
from backbones.weights import (
    BackboneWeightsError,
    infer_model_kwargs,
    load_backbone_state,
    load_backbone_weights,
    read_backbone_weights,
    save_backbone_weights,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).parent.parent / "data"
ARC_KEYS = DATA / "arcface_torch_keys"
ARCFACE_MODELS = ["r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large"]
ARCFACE_MODELS += ["vit_t", "vit_s", "vit_b", "vit_l"]


def _key_list(path: Path) -> dict[str, tuple[int, ...]]:
    """``key shape`` lines (``-`` for a scalar) after ``#`` comments."""
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split()
            out[key] = () if shape == "-" else tuple(int(s) for s in shape.split(","))
    return out


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _probe(n: int, size: int) -> torch.Tensor:
    """An RNG-free input in [-1, 1], ``(n, 3, size, size)``."""
    i = torch.arange(n * 3 * size * size, dtype=torch.float64)
    return torch.sin(i * 0.7311).reshape(n, 3, size, size).float()


# ------------------------------------------------------------- names and shapes
@pytest.mark.parametrize("name", ARCFACE_MODELS)
def test_state_dict_keys_and_shapes_are_arcface_torchs(name: str) -> None:
    """Every parameter and buffer (num_batches_tracked included) has arcface_torch's
    name and shape: its backbone.pth loads with strict=True, ours loads into its code.
    Built on the meta device: no memory, no initialisation cost."""
    with torch.device("meta"):
        model = get_model(name)
    assert _shapes(model) == _key_list(ARC_KEYS / f"{name}.txt")


def test_mbf_stage0_grouping_and_the_depthwise_option() -> None:
    """insightface's mbf stage 0 has groups=64 (weight (128, 2, 3, 3)); the fully
    depthwise variant (the MobileFaceNet paper's, and mbf_tiny's) is an option."""
    with torch.device("meta"):
        grouped = get_model("mbf")
        depthwise = get_model("mbf", depthwise_stage0=True)
        tiny = get_model("mbf_tiny")
    key = "layers.1.layers.0.weight"
    assert grouped.state_dict()[key].shape == (128, 2, 3, 3)
    assert depthwise.state_dict()[key].shape == (128, 1, 3, 3)
    assert tiny.state_dict()[key].shape == (32, 1, 3, 3)
    assert _shapes(grouped).keys() == _shapes(depthwise).keys()


def test_frozen_batchnorm_keeps_the_state_dict_keys() -> None:
    model = get_model("mbf_tiny", embedding_size=8)
    frozen = freeze_batchnorm(get_model("mbf_tiny", embedding_size=8))
    assert _shapes(frozen) == _shapes(model)
    frozen.load_state_dict(model.state_dict(), strict=True)


# ------------------------------------------------- embeddings vs a functional forward
def _bn(x: torch.Tensor, s: dict, p: str, eps: float = 1e-5) -> torch.Tensor:
    return F.batch_norm(
        x, s[f"{p}.running_mean"], s[f"{p}.running_var"], s[f"{p}.weight"], s[f"{p}.bias"],
        False, 0.0, eps,
    )  # fmt: skip


def _conv(x: torch.Tensor, s: dict, p: str, stride: int = 1, padding: int | None = None):
    """A bias-free conv whose groups follow from the weight: in_channels / weight dim 1."""
    w = s[f"{p}.weight"]
    pad = w.shape[-1] // 2 if padding is None else padding
    return F.conv2d(x, w, None, stride, pad, groups=x.shape[1] // w.shape[1])


def iresnet_reference(s: dict, x: torch.Tensor) -> torch.Tensor:
    """arcface_torch's IResNet: conv1-bn1-prelu; per unit bn1-conv1-bn2-prelu-conv2
    (stride 2 in a stage's first unit)-bn3 plus the shortcut (downsample conv1x1
    stride 2 + BN on the first unit); bn2, flatten, fc, features. BN eps 1e-5."""
    x = F.prelu(_bn(_conv(x, s, "conv1"), s, "bn1"), s["prelu.weight"])
    for stage in range(1, 5):
        i = 0
        while f"layer{stage}.{i}.conv1.weight" in s:
            p, stride = f"layer{stage}.{i}", 2 if i == 0 else 1
            out = _bn(_conv(_bn(x, s, f"{p}.bn1"), s, f"{p}.conv1"), s, f"{p}.bn2")
            out = _conv(F.prelu(out, s[f"{p}.prelu.weight"]), s, f"{p}.conv2", stride)
            out = _bn(out, s, f"{p}.bn3")
            if f"{p}.downsample.0.weight" in s:
                x = _bn(_conv(x, s, f"{p}.downsample.0", stride), s, f"{p}.downsample.1")
            x = out + x
            i += 1
    x = _bn(x, s, "bn2").flatten(1)
    return _bn(F.linear(x, s["fc.weight"], s["fc.bias"]), s, "features")


def _cblock(x, s: dict, p: str, stride: int = 1, padding: int | None = None, act: bool = True):
    x = _bn(_conv(x, s, f"{p}.layers.0", stride, padding), s, f"{p}.layers.1")
    return F.prelu(x, s[f"{p}.layers.2.weight"]) if act else x


def _depthwise(x, s: dict, p: str, stride: int, residual: bool):
    y = _cblock(x, s, f"{p}.layers.0")
    y = _cblock(y, s, f"{p}.layers.1", stride)
    y = _cblock(y, s, f"{p}.layers.2", act=False)
    return x + y if residual else y


def _residual(x, s: dict, p: str):
    i = 0
    while f"{p}.layers.{i}.layers.0.layers.0.weight" in s:
        x = _depthwise(x, s, f"{p}.layers.{i}", 1, True)
        i += 1
    return x


def mobilefacenet_reference(s: dict, x: torch.Tensor) -> torch.Tensor:
    """arcface_torch's MobileFaceNet: layers.0 ConvBlock stride 2; layers.1 a single
    (grouped) ConvBlock or a Residual; DepthWise stride 2 + Residual, three times;
    conv_sep; GDC: LinearBlock 7x7 (no padding), flatten, linear, BatchNorm1d."""
    x = _cblock(x, s, "layers.0", stride=2)
    single = "layers.1.layers.0.weight" in s
    x = _cblock(x, s, "layers.1") if single else _residual(x, s, "layers.1")
    for down, res in ((2, 3), (4, 5), (6, 7)):
        x = _residual(_depthwise(x, s, f"layers.{down}", 2, False), s, f"layers.{res}")
    x = _cblock(x, s, "conv_sep")
    x = _cblock(x, s, "features.layers.0", padding=0, act=False).flatten(1)
    return _bn(F.linear(x, s["features.layers.2.weight"]), s, "features.layers.3")


def vit_reference(s: dict, x: torch.Tensor, heads: int, patch: int = 9) -> torch.Tensor:
    """arcface_torch's ViT (norm_layer "ln"): patch conv + pos_embed; per block
    x + proj(softmax(q k^T * d_head^-0.5) v) on norm1(x), then x + fc2(relu6(fc1(
    norm2(x)))); LayerNorm eps 1e-5; no qkv bias; feature: linear, BN(2e-5), linear,
    BN(2e-5), no activation."""
    x = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2) + s["pos_embed"]
    b, n, d = x.shape
    i = 0
    while f"blocks.{i}.norm1.weight" in s:
        p = f"blocks.{i}"
        h = F.layer_norm(x, (d,), s[f"{p}.norm1.weight"], s[f"{p}.norm1.bias"], 1e-5)
        qkv = F.linear(h, s[f"{p}.attn.qkv.weight"]).reshape(b, n, 3, heads, d // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)
        x = x + F.linear(out, s[f"{p}.attn.proj.weight"], s[f"{p}.attn.proj.bias"])
        h = F.layer_norm(x, (d,), s[f"{p}.norm2.weight"], s[f"{p}.norm2.bias"], 1e-5)
        h = F.relu6(F.linear(h, s[f"{p}.mlp.fc1.weight"], s[f"{p}.mlp.fc1.bias"]))
        x = x + F.linear(h, s[f"{p}.mlp.fc2.weight"], s[f"{p}.mlp.fc2.bias"])
        i += 1
    x = F.layer_norm(x, (d,), s["norm.weight"], s["norm.bias"], 1e-5).reshape(b, n * d)
    x = _bn(F.linear(x, s["feature.0.weight"]), s, "feature.1", 2e-5)
    return _bn(F.linear(x, s["feature.2.weight"]), s, "feature.3", 2e-5)


def _realistic(model: nn.Module, size: int, small_var: str) -> nn.Module:
    """Random affine/PReLU/bias values, BatchNorm statistics of one batch (a realistic
    scale), and tiny running variances in the BN ``small_var`` so its eps matters.
    A ViT's tokens are made tiny (variance ~1e-6) so the LayerNorm eps matters too."""
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for t in model.parameters():
            if t.dim() <= 1:
                t.add_(0.2 * torch.randn(t.shape, generator=g))
        if hasattr(model, "pos_embed"):
            for t in (model.pos_embed, *model.patch_embed.parameters()):
                t.mul_(1e-3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, size, size, generator=g) * 2 - 1)
        bn = model.get_submodule(small_var)
        bn.running_var.mul_(1e-4)
    return model.eval()


REFERENCE_CASES = {
    # name, kwargs, input side, the BN whose eps is probed, reference
    "r18": ({"input_size": 32}, 32, "features", iresnet_reference),
    "mbf": ({}, 112, "features.layers.3", mobilefacenet_reference),
    "vit_t": (
        {"dim": 32, "depth": 2, "num_heads": 4, "embedding_size": 64},
        112,
        "feature.3",
        lambda s, x: vit_reference(s, x, heads=4),
    ),
}


@pytest.mark.parametrize("name", list(REFERENCE_CASES))
def test_embeddings_equal_a_functional_arcface_torch_forward(name: str) -> None:
    """Our model in eval mode equals a float64 functional forward written from
    arcface_torch's architecture facts, reading the weights by its key names."""
    kwargs, side, small_var, reference = REFERENCE_CASES[name]
    torch.manual_seed(0)
    model = _realistic(get_model(name, **kwargs), side, small_var)
    x = _probe(3, side)
    with torch.no_grad():
        ours = model(x).double()
    state = {k: v.double() for k, v in model.state_dict().items()}
    expected = reference(state, x.double())
    scale = expected.abs().max().item()
    assert scale > 1.0  # the probed BN's small variance shows in the output
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4 * scale)


# ------------------------------------------------------------------ weight files
def _small_state(embedding_size: int = 8) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return get_model("mbf_tiny", embedding_size=embedding_size).state_dict()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_weights_round_trip(tmp_path: Path, suffix: str) -> None:
    state = _small_state()
    path = tmp_path / f"backbone{suffix}"
    save_backbone_weights(state, path)
    read = read_backbone_weights(path)
    assert sorted(read) == sorted(state)  # (safetensors stores the keys sorted)
    for key, value in state.items():
        assert torch.equal(read[key], value) and read[key].dtype == value.dtype, key
    model = get_model("mbf_tiny", embedding_size=8)
    load_backbone_weights(model, path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporaries left
    if suffix == ".safetensors":  # really a safetensors file
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            assert set(fh.keys()) == set(state)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped(tmp_path: Path, prefix: str) -> None:
    """DDP's module. and torch.compile's _orig_mod. prefixes load: from a file and
    through load_backbone_state; the embedding size is read off the prefixed keys."""
    state = _small_state()
    prefixed = {prefix + k: v for k, v in state.items()}
    path = tmp_path / "ddp.pt"
    torch.save(prefixed, path)
    assert list(read_backbone_weights(path)) == list(state)
    for load in (
        lambda m: load_backbone_weights(m, path),
        lambda m: load_backbone_state(m, prefixed),
    ):
        model = get_model("mbf_tiny", embedding_size=8)
        load(model)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert infer_model_kwargs(prefixed) == {"embedding_size": 8}


def test_nested_checkpoints_are_read(tmp_path: Path) -> None:
    """arcface_torch's training checkpoint (state_dict_backbone) and our trainer.pt
    (backbone) hold the weights one level down."""
    state = _small_state()
    torch.save({"epoch": 3, "state_dict_backbone": state, "state_optimizer": {}}, tmp_path / "a.pt")
    assert list(read_backbone_weights(tmp_path / "a.pt")) == list(state)
    torch.save({"backbone": state, "progress": {"step": 1}}, tmp_path / "trainer.pt")
    assert list(read_backbone_weights(tmp_path / "trainer.pt")) == list(state)


def test_weights_of_another_embedding_size_name_file_key_and_shapes(tmp_path: Path) -> None:
    path = tmp_path / "emb8.safetensors"
    save_backbone_weights(_small_state(8), path)
    model = get_model("mbf_tiny", embedding_size=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BackboneWeightsError) as info:
        load_backbone_weights(model, path)
    message = str(info.value)
    assert message.startswith(f"{path}: weights of another architecture or embedding size")
    assert "features.layers.2.weight has shape (8, 128) in the file but (16, 128)" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_weights_of_another_architecture_name_missing_and_unexpected(tmp_path: Path) -> None:
    path = tmp_path / "vit.pt"
    save_backbone_weights(get_model("vit_t", dim=16, depth=1, num_heads=2).state_dict(), path)
    model = get_model("mbf_tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BackboneWeightsError) as info:
        load_backbone_weights(model, path)
    message = str(info.value)
    assert message.startswith(f"{path}: weights of another architecture: ")
    assert "are missing (first: layers.0.layers.0.weight)" in message
    assert "not in the model (first: pos_embed)" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_grouped_mbf_weights_into_the_depthwise_variant_give_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "mbf.pt"
    with torch.device("meta"):
        grouped = get_model("mbf").state_dict()
    save_backbone_weights(
        {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in grouped.items()}, path
    )
    with pytest.raises(BackboneWeightsError, match=r"\(128, 2, 3, 3\) in the file but \(128, 1"):
        load_backbone_weights(get_model("mbf", depthwise_stage0=True), path)


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.pt: no such weights file"):
        read_backbone_weights(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip file")
    with pytest.raises(BackboneWeightsError, match=r"junk\.pt: not a readable weights file"):
        read_backbone_weights(tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(BackboneWeightsError, match=r"junk\.safetensors: not a readable"):
        read_backbone_weights(tmp_path / "junk.safetensors")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(BackboneWeightsError, match=r"meta\.pt: not a backbone state_dict: entry"):
        read_backbone_weights(tmp_path / "meta.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(BackboneWeightsError, match=r"list\.pt: expected a state_dict"):
        read_backbone_weights(tmp_path / "list.pt")


def test_a_failed_save_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "backbone.pt"
    save_backbone_weights(_small_state(), path)
    before = path.read_bytes()

    def broken(obj: object, fh: object) -> None:
        fh.write(b"partial")  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="No space left on device"):
        save_backbone_weights(_small_state(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["backbone.pt"]
