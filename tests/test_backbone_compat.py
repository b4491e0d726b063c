"""arcface_torch state-dict compatibility of the backbones, the format-1 translation and
the weight files of :mod:`backbones.weights`.

References, none of them our model code:

* ``tests/data/arcface_torch_keys/<name>.txt``: arcface_torch's ``state_dict`` keys and
  shapes, built by ``make_keys.py`` there from facts read in its ``backbones/``;
* a functional forward (``torch.nn.functional`` on the state dict, by arcface_torch's
  key names and architecture facts, in float64) for the embedding checks;
* ``tests/data/legacy_backbones/``: key lists, a tiny ViT and a trainer checkpoint
  written by this project's format-1 code (commit 363fd67, before the rename), with
  the embeddings that code computed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backbones import freeze_batchnorm, get_model
from backbones.weights import (
    BackboneWeightsError,
    infer_model_kwargs,
    load_backbone_state,
    load_backbone_weights,
    read_backbone_weights,
    rename_legacy_keys,
    save_backbone_weights,
    v1_model_kwargs,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).parent / "data"
ARC_KEYS = DATA / "arcface_torch_keys"
LEGACY = DATA / "legacy_backbones"
V1_RUN = LEGACY / "v1_run"
V1_CKPT = V1_RUN / "checkpoints" / "step-00000001"
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
    """The RNG-free input the format-1 references were computed on, in [-1, 1]."""
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
    depthwise variant (this project's format-1 mbf, and mbf_tiny) is an option."""
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


# ---------------------------------------------------------------- format 1
LEGACY_CASES = {  # key list -> the model it loads into
    "r18": ("r18", {}),
    "mbf": ("mbf", {"depthwise_stage0": True}),
    "mbf_large": ("mbf_large", {}),
    "mbf_tiny": ("mbf_tiny", {}),
    "vit_t": ("vit_t", {"layout": "v1"}),
}


@pytest.mark.parametrize("old", list(LEGACY_CASES))
def test_format1_names_translate_by_position(old: str) -> None:
    """A state dict with the format-1 keys and shapes loads strictly (through the
    model's own load_state_dict: every place that loads weights), and every tensor
    lands at the same position of the new state_dict (the rename preserves module
    order; the architectures are the same)."""
    name, kwargs = LEGACY_CASES[old]
    g = torch.Generator().manual_seed(0)
    state = {
        k: torch.randint(0, 9, s, generator=g) if k.endswith("num_batches_tracked")
        else torch.randn(s, generator=g)
        for k, s in _key_list(LEGACY / f"{old}_v1.txt").items()
    }  # fmt: skip
    with torch.device("meta"):
        model = get_model(name, **kwargs)
    model = model.to_empty(device="cpu")
    model.load_state_dict(state, strict=True)  # the model's pre-hook translates
    new = model.state_dict()
    assert len(new) == len(state)
    for (old_key, a), (new_key, b) in zip(state.items(), new.items(), strict=True):
        assert torch.equal(a, b), (old_key, new_key)


def _v1_backbone() -> dict[str, torch.Tensor]:
    return torch.load(V1_CKPT / "trainer.pt", weights_only=True)["backbone"]


def _v1_embedding() -> torch.Tensor:
    return torch.load(V1_RUN / "embedding.pt", weights_only=True)["embedding"]


def test_format1_backbone_pt_gives_its_embeddings_in_eval_and_export(tmp_path: Path) -> None:
    """A backbone.pt written by format-1 code (mbf_tiny, embedding 8; the same dict the
    format-1 export wrote) loads in eval's build_backbone, which reads the embedding
    size off the file, and reproduces the embeddings format-1 code computed; its
    weights also load into insightface's grouped stage 0 (the depthwise weights
    widened with zeros: the same function) and export to ONNX."""
    from eval.export_onnx import main as export_main
    from eval.models import build_backbone

    path = tmp_path / "backbone.pt"
    torch.save(_v1_backbone(), path)
    x, expected = _probe(2, 112), _v1_embedding()
    model = build_backbone("mbf_tiny", path)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    grouped = get_model("mbf_tiny", embedding_size=8, depthwise_stage0=False)
    load_backbone_weights(grouped, path)
    assert grouped.state_dict()["layers.1.layers.0.weight"].shape == (32, 2, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(grouped.eval()(x), expected, rtol=1e-5, atol=1e-6)
    diff = export_main(
        ["--network", "mbf_tiny", "--checkpoint", str(path), "--output",
         str(tmp_path / "m.onnx"), "--exporter", "torchscript"]
    )  # fmt: skip
    assert diff < 1e-4


def test_format1_vit_loads_with_the_v1_layout() -> None:
    """A tiny ViT saved by format-1 code (qkv biases, GELU, ReLU in the head) loads
    into layout="v1" and reproduces its embeddings; the arcface layout refuses it
    with a hint; eval infers the layout and the embedding size from the file."""
    saved = torch.load(LEGACY / "vit_tiny_v1.pt", weights_only=True)
    kwargs = {k: v for k, v in saved["kwargs"].items() if k != "embedding_size"}
    state = saved["state_dict"]
    assert infer_model_kwargs(state) == {"embedding_size": 8, "layout": "v1"}
    model = get_model("vit_t", **kwargs, **infer_model_kwargs(state), mask_ratio=0.0)
    load_backbone_state(model, state)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(_probe(2, 36)), saved["embedding"])
    arcface = get_model("vit_t", **kwargs, embedding_size=8)
    with pytest.raises(BackboneWeightsError, match=r"qkv\.bias.*layout='v1'"):
        load_backbone_state(arcface, state, "vit_tiny_v1.pt")


def test_format1_model_kwargs_for_resumed_checkpoints() -> None:
    assert v1_model_kwargs("mbf") == {"depthwise_stage0": True}
    assert v1_model_kwargs("mbf", {"depthwise_stage0": True}) == {}
    assert v1_model_kwargs("mbf_tiny") == {} and v1_model_kwargs("mbf_large") == {}
    assert v1_model_kwargs("r50") == {} and v1_model_kwargs("no_such_net") == {}
    assert v1_model_kwargs("vit_t") == {"layout": "v1"}


def test_format1_trainer_checkpoint_resumes(tmp_path: Path) -> None:
    """A trainer checkpoint written by format-1 code (mbf_tiny, 11 classes) resumes:
    the backbone's old names are translated, every SGD momentum buffer reaches the
    parameter it belonged to, the embeddings are format 1's, training continues and
    the next checkpoint is format 2 with arcface_torch's names."""
    from partial_fc import ArcFace, PartialFC
    from tests.test_trainer import CLASSES, EMB, TensorLoader, make_cfg
    from trainer import DistContext, Trainer

    out = tmp_path / "run"
    shutil.copytree(V1_RUN / "checkpoints", out / "checkpoints")
    cfg = make_cfg(out, "optimizer.name=sgd", "checkpoint.keep_last=1")
    model = get_model("mbf_tiny", embedding_size=EMB)
    head = PartialFC(CLASSES, EMB, ArcFace(16.0, 0.3), sample_rate=1.0, seed=cfg.train.seed)
    g = torch.Generator().manual_seed(11)
    x, y = torch.rand(16, 3, 112, 112, generator=g) * 2 - 1, torch.arange(16) % CLASSES
    trainer = Trainer(cfg, model, head, TensorLoader(x, y, 8, 0, 1), DistContext())
    assert trainer.maybe_resume() == out / "checkpoints" / V1_CKPT.name
    assert trainer.step == 1

    old = torch.load(V1_CKPT / "trainer.pt", weights_only=True)
    old_params = [
        k for k in old["backbone"]
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    ]  # fmt: skip
    new_name = rename_legacy_keys(old["backbone"], model.legacy_renames())
    params = dict(model.named_parameters())
    for index, key in enumerate(old_params):
        momentum = old["backbone_optimizer"]["state"][index]["momentum_buffer"]
        mine = trainer.opt_backbone.state[params[new_name[key]]]["momentum_buffer"]
        assert torch.equal(mine, momentum), key
    for key, value in old["backbone"].items():
        assert torch.equal(model.state_dict()[new_name[key]], value), key
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(_probe(2, 112)), _v1_embedding(), rtol=1e-5, atol=1e-6)
    model.train()
    trainer.train_step([(x[8:], y[8:])])
    ckpt = trainer.save_checkpoint()
    assert json.loads((ckpt / "meta.json").read_text())["format"] == 2
    saved = torch.load(ckpt / "trainer.pt", weights_only=True)["backbone"]
    assert list(saved) == list(model.state_dict())
    assert "layers.0.layers.0.weight" in saved and not any(k.startswith("stem.") for k in saved)


def test_format1_mbf_checkpoint_names_the_kwarg_it_needs(tmp_path: Path) -> None:
    """A format-1 checkpoint of mbf (whose stage 0 was depthwise) refuses a resume into
    the grouped mbf, naming model.kwargs.depthwise_stage0 (before any state loads)."""
    from configs import ConfigError
    from partial_fc import ArcFace, PartialFC
    from tests.test_trainer import CLASSES, EMB, TensorLoader, make_cfg
    from trainer import DistContext, Trainer
    from trainer.checkpoint import file_digest

    out = tmp_path / "run"
    shutil.copytree(V1_RUN / "checkpoints", out / "checkpoints")
    ckpt = out / "checkpoints" / V1_CKPT.name
    shared = torch.load(ckpt / "trainer.pt", weights_only=True)
    config = json.loads(shared["config"])
    config["model"]["network"] = "mbf"  # as if the format-1 run had trained mbf
    shared["config"] = json.dumps(config)
    torch.save(shared, ckpt / "trainer.pt")
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"]["trainer.pt"] = (ckpt / "trainer.pt").stat().st_size
    meta["sha256"]["trainer.pt"] = file_digest(ckpt / "trainer.pt")
    (ckpt / "meta.json").write_text(json.dumps(meta))

    cfg = make_cfg(out, "optimizer.name=sgd", "model.network=mbf")
    head = PartialFC(CLASSES, EMB, ArcFace(16.0, 0.3), seed=cfg.train.seed)
    g = torch.Generator().manual_seed(11)
    x, y = torch.rand(16, 3, 112, 112, generator=g) * 2 - 1, torch.arange(16) % CLASSES
    model = get_model("mbf_tiny", embedding_size=EMB)  # the network is not built from cfg
    trainer = Trainer(cfg, model, head, TensorLoader(x, y, 8, 0, 1), DistContext())
    with pytest.raises(ConfigError, match=r"model\.kwargs\.depthwise_stage0=True"):
        trainer.maybe_resume()


def test_a_checkpoint_of_a_newer_format_is_refused(tmp_path: Path) -> None:
    from partial_fc import ArcFace, PartialFC
    from tests.test_trainer import CLASSES, EMB, TensorLoader, make_cfg
    from trainer import DistContext, Trainer
    from trainer.checkpoint import CheckpointError

    out = tmp_path / "run"
    shutil.copytree(V1_RUN / "checkpoints", out / "checkpoints")
    meta_path = out / "checkpoints" / V1_CKPT.name / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["format"] = 3
    meta_path.write_text(json.dumps(meta))
    cfg = make_cfg(out, "optimizer.name=sgd")
    head = PartialFC(CLASSES, EMB, ArcFace(16.0, 0.3), seed=cfg.train.seed)
    x, y = torch.zeros(16, 3, 112, 112), torch.arange(16) % CLASSES
    model = get_model("mbf_tiny", embedding_size=EMB)
    trainer = Trainer(cfg, model, head, TensorLoader(x, y, 8, 0, 1), DistContext())
    with pytest.raises(CheckpointError, match=r"has checkpoint format 3, newer than .* 2"):
        trainer.maybe_resume()


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
    """DDP's module. and torch.compile's _orig_mod. prefixes load: from a file, through
    load_backbone_state, and through the model's own load_state_dict (its pre-hook)."""
    state = _small_state()
    prefixed = {prefix + k: v for k, v in state.items()}
    path = tmp_path / "ddp.pt"
    torch.save(prefixed, path)
    assert list(read_backbone_weights(path)) == list(state)
    for load in (
        lambda m: load_backbone_weights(m, path),
        lambda m: load_backbone_state(m, prefixed),
        lambda m: m.load_state_dict(prefixed, strict=True),
    ):
        model = get_model("mbf_tiny", embedding_size=8)
        load(model)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_format1_names_load_inside_a_wrapper() -> None:
    """The pre-hook also translates under a prefix (the model inside DDP): the wrapper's
    load_state_dict takes ``module.stem.0.weight`` ..."""
    state = _v1_backbone()
    wrapper = nn.Module()
    wrapper.module = get_model("mbf_tiny", embedding_size=8)
    wrapper.load_state_dict({f"module.{k}": v for k, v in state.items()}, strict=True)
    assert torch.equal(wrapper.module.layers[0].layers[0].weight, state["stem.0.weight"])


def test_nested_checkpoints_are_read(tmp_path: Path) -> None:
    """arcface_torch's training checkpoint (state_dict_backbone) and our trainer.pt
    (backbone) hold the weights one level down."""
    state = _small_state()
    torch.save({"epoch": 3, "state_dict_backbone": state, "state_optimizer": {}}, tmp_path / "a.pt")
    assert list(read_backbone_weights(tmp_path / "a.pt")) == list(state)
    assert list(read_backbone_weights(V1_CKPT / "trainer.pt")) == list(_v1_backbone())


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
