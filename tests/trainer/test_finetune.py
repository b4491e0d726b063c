"""Fine-tuning (issue 16, items 2 and 5): ``model.init_from``, ``head.init=imprint``,
``model.freeze_*``, ``optimizer.backbone_lr_mult`` and the weight-decay groups
(:mod:`trainer.finetune`, :mod:`partial_fc.imprint`).

References are independent of the code under test: imprinted centres against a dense
float64 computation over the whole data set; frozen and no-decay parameters against
prefix lists and module types written here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backbones.registry import get_model
from common.dist import DistContext
from configs import ConfigError, config_to_dict, load_config
from partial_fc import ArcFace, PartialFC
from partial_fc.imprint import SUBCENTER_JITTER
from tests.distributed import run_ranks
from tests.tolerances import gamma
from trainer.build import build_backbone, build_trainer
from trainer.checkpoint import compare_configs
from trainer.finetune import (
    backbone_param_groups,
    backbone_parts,
    freeze_backbone,
    imprint_head,
)
from trainer.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(output: Path | str, *overrides: str) -> Any:
    return load_config(
        "demo",
        [
            f"train.output={output}",
            "log.tensorboard=false",
            "log.progress_bar=false",
            "checkpoint.every_steps=0",
            *overrides,
        ],
    )


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize(
    ("override", "option"),
    [
        ("model.freeze_units=-1", "model.freeze_units"),
        ("optimizer.backbone_lr_mult=0", "optimizer.backbone_lr_mult"),
        ("optimizer.backbone_lr_mult=nan", "optimizer.backbone_lr_mult"),
        ("optimizer.backbone_lr_mult=50000", "optimizer.backbone_lr_mult"),  # lr*mult*wd >= 1
        ("head.init=pretrained", "head.init"),
    ],
)
def test_bad_options_are_named(override: str, option: str) -> None:
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        _cfg("/tmp/unused", override)


def test_the_documented_fine_tuning_command_configures_a_fine_tune() -> None:
    """docs/training.md's one command: the preset plus its placeholders' overrides."""
    cfg = load_config(
        "configs/finetune_r50",
        [
            "model.init_from=backbone.pth",
            "data.root=/data/mine",
            "data.num_classes=733",
            "data.num_images=21000",
        ],
    )
    assert (cfg.model.network, cfg.model.init_from, cfg.head.init) == (
        "r50",
        "backbone.pth",
        "imprint",
    )
    assert cfg.optimizer.backbone_lr_mult < 1 and cfg.eval.targets == []
    assert load_config("finetune_r50").model.init_from  # a placeholder, never "random init"


def test_resume_policy_of_the_fine_tuning_options() -> None:
    base = config_to_dict(_cfg("/tmp/x"))
    may = {
        ("model", "init_from"): "/w/backbone.pth",
        ("model", "freeze_bn_stats"): True,
        ("head", "init"): "imprint",
        ("optimizer", "backbone_lr_mult"): 0.1,
    }
    fixed = {
        ("model", "freeze_stem"): True,
        ("model", "freeze_units"): 3,
        ("optimizer", "weight_decay_exclude_norm_bias"): True,
    }
    for (section, key), value in {**may, **fixed}.items():
        other = json.loads(json.dumps(base))
        other[section][key] = value
        changed, refused = compare_configs(base, other)
        if (section, key) in may:
            assert [c[0] for c in changed] == [f"{section}.{key}"] and refused == []
        else:
            assert [r[0] for r in refused] == [f"{section}.{key}"] and changed == []
            assert "backbone optimizer" in refused[0][3]  # the reason says why


# ------------------------------------------------------------------------ layouts
def _arcface_iresnet_names(layers: tuple[int, ...]) -> list[str]:
    """Parameter names of arcface_torch's iresnet (facts from its backbones/iresnet.py)."""
    names = ["conv1.weight", "bn1.weight", "bn1.bias", "prelu.weight"]
    for s, depth in enumerate(layers, 1):
        for i in range(depth):
            p = f"layer{s}.{i}"
            names += [f"{p}.bn1.weight", f"{p}.bn1.bias", f"{p}.conv1.weight", f"{p}.bn2.weight"]
            names += [f"{p}.bn2.bias", f"{p}.prelu.weight", f"{p}.conv2.weight", f"{p}.bn3.weight"]
            names += [f"{p}.bn3.bias"]
            if i == 0:
                names += [f"{p}.downsample.0.weight", f"{p}.downsample.1.weight"]
                names += [f"{p}.downsample.1.bias"]
    return [*names, "bn2.weight", "bn2.bias", "fc.weight", "fc.bias", "features.bias"]


def _arcface_mbf_names(blocks: tuple[int, ...] = (1, 4, 6, 2)) -> list[str]:
    """Parameter names of arcface_torch's MobileFaceNet: ``layers`` = [ConvBlock stem,
    stage 0, DepthWise, Residual, DepthWise, Residual, DepthWise, Residual], each
    ConvBlock/LinearBlock a ``layers`` Sequential (conv, BN[, PReLU])."""

    def conv(p: str, act: bool = True) -> list[str]:
        out = [f"{p}.layers.0.weight", f"{p}.layers.1.weight", f"{p}.layers.1.bias"]
        return out + ([f"{p}.layers.2.weight"] if act else [])

    def depthwise(p: str) -> list[str]:
        return conv(f"{p}.layers.0") + conv(f"{p}.layers.1") + conv(f"{p}.layers.2", act=False)

    def residual(p: str, n: int) -> list[str]:
        return [name for j in range(n) for name in depthwise(f"{p}.layers.{j}")]

    names = conv("layers.0")
    names += conv("layers.1") if blocks[0] == 1 else residual("layers.1", blocks[0])
    for i, n in zip((2, 4, 6), blocks[1:], strict=True):
        names += depthwise(f"layers.{i}") + residual(f"layers.{i + 1}", n)
    names += conv("conv_sep") + conv("features.layers.0", act=False)
    return [*names, "features.layers.2.weight", "features.layers.3.weight"]


def _arcface_vit_names(depth: int = 12) -> list[str]:
    names = ["pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        names += [f"blocks.{i}.norm1.weight", f"blocks.{i}.attn.qkv.weight"]
        names += [f"blocks.{i}.mlp.fc2.bias"]
    return [*names, "norm.weight", "feature.0.weight", "feature.3.bias"]


@pytest.mark.parametrize(
    ("network", "names", "stem", "units", "first"),
    [
        ("r18", _arcface_iresnet_names((2, 2, 2, 2)), 4, 8, ["layer1.0", "layer1.1", "layer2.0"]),
        ("r50", _arcface_iresnet_names((3, 4, 14, 3)), 4, 24, ["layer1.0", "layer1.1"]),
        # stage 0 (one conv), then 1 + 4, 1 + 6, 1 + 2 units; conv_sep is not a unit
        ("mbf", _arcface_mbf_names(), 4, 16, ["layers.1", "layers.2", "layers.3.layers.0"]),
        ("mbf_large", _arcface_mbf_names((2, 8, 12, 4)), 4, 29, ["layers.1.layers.0"]),
        # the mask token stands in for masked patches: part of the stem
        ("vit_t", _arcface_vit_names(), 4, 12, ["blocks.0", "blocks.1", "blocks.2"]),
    ],
)
def test_arcface_torch_layouts(
    network: str, names: list[str], stem: int, units: int, first: list[str]
) -> None:
    """arcface_torch's names split by the network's registry entry."""
    parts = backbone_parts(names, network)
    assert len(parts.stem) == stem and len(parts.units) == units
    assert parts.units[: len(first)] == first
    model = [n for n, _ in get_model(network).named_parameters()]
    assert set(names) <= set(model), network  # the models have the names written above
    assert backbone_parts(model, network).units == parts.units


def test_names_in_no_part_are_refused_naming_the_options() -> None:
    with pytest.raises(ConfigError, match=r"model\.freeze_stem / model\.freeze_units: .*'0\.w"):
        backbone_parts(["conv1.weight", "0.weight"], "r50")


# ---------------------------------------------------------------------- freezing
#: Facts of the three families (arcface_torch's names, which the backbones use): the
#: stem and the first two units' name prefixes, and the number of units.
FIRST_TWO = {
    "r18": ((("conv1.", "bn1.", "prelu."), ("layer1.0.", "layer1.1.")), 8),
    "mbf": ((("layers.0.",), ("layers.1.", "layers.2.")), 16),
    "vit_t": ((("patch_embed.", "pos_embed", "mask_token"), ("blocks.0.", "blocks.1.")), 12),
}


@pytest.mark.parametrize("network", sorted(FIRST_TWO))
def test_freeze_stem_and_units_by_name(network: str) -> None:
    cfg = _cfg("/tmp/unused", f"model.network={network}", "model.freeze_units=2").model
    model = get_model(network)
    names = [n for n, _ in model.named_parameters()]
    (stem, units), count = FIRST_TWO[network]
    report = freeze_backbone(model, cfg)
    expected = {n for n in names if n.startswith(stem + units)}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    fixed_before = {"features.weight"} if network == "r18" else set()  # fixed BN scale
    assert expected and frozen - fixed_before == expected
    assert report.num_units == count
    assert sorted(report.frozen_params or []) == sorted(expected)
    # BatchNorm layers inside the frozen part keep their statistics through training
    # steps; the others update them
    model.train()
    bns = {n: m for n, m in model.named_modules() if getattr(m, "running_mean", None) is not None}
    before = {n: m.running_mean.clone() for n, m in bns.items()}
    assert before  # every family has BatchNorm layers
    model(torch.rand(2, 3, 112, 112))
    assert sorted(report.eval_norms or []) == sorted(
        n for n in before if f"{n}.".startswith(stem + units)
    )
    for name, mean in before.items():
        unchanged = torch.equal(bns[name].running_mean, mean)
        assert unchanged == f"{name}.".startswith(stem + units), name
    with pytest.raises(ConfigError, match=f"has {count} residual units"):
        freeze_backbone(get_model(network), cfg.__class__(network, freeze_units=count + 1))


class _ImageLoader:
    """Random 112x112 images in memory, one fixed batch order (the trainer's protocol)."""

    def __init__(self, n: int, batch: int, classes: int) -> None:
        g = torch.Generator().manual_seed(3)
        self.x = torch.rand(n, 3, 112, 112, generator=g) * 2 - 1
        self.y = torch.arange(n) % classes
        self.batch = batch

    def set_epoch(self, epoch: int) -> None:
        del epoch

    def __len__(self) -> int:
        return len(self.x) // self.batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(len(self)):
            s = slice(i * self.batch, (i + 1) * self.batch)
            yield self.x[s], self.y[s]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


@pytest.mark.parametrize("bn_stats", [False, True])
def test_frozen_parts_do_not_change_while_the_rest_trains(tmp_path: Path, bn_stats: bool) -> None:
    """mbf_tiny, stem + 2 units frozen, backbone LR x 0.1, no decay on norms and biases:
    three steps change every trainable tensor and no frozen one; the optimizer holds
    exactly the trainable parameters; the backbone's LR is the head's x 0.1 at every
    step of the schedule."""
    classes, emb = 5, 32
    cfg = _cfg(
        tmp_path,
        "model.network=mbf_tiny",
        f"model.embedding_size={emb}",
        f"data.num_classes={classes}",
        "data.batch_size=4",
        "model.freeze_units=2",
        f"model.freeze_bn_stats={str(bn_stats).lower()}",
        "optimizer.backbone_lr_mult=0.1",
        "optimizer.weight_decay_exclude_norm_bias=true",
        # every update visible in fp32 next to BN scales of 1.0 (eval-mode BN on random
        # weights has large activations: clipping would shrink some updates below it)
        "optimizer.lr=0.5",
        "train.clip_grad_norm=null",
        "scheduler.warmup_epochs=0",
    )
    torch.manual_seed(0)
    backbone = build_backbone(cfg)
    freeze_backbone(backbone, cfg.model)
    head = PartialFC(classes, emb, ArcFace(16.0, 0.3), seed=0)
    trainer = Trainer(cfg, backbone, head, _ImageLoader(16, 4, classes), DistContext())
    state0 = {k: v.clone() for k, v in backbone.state_dict().items()}
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    in_optimizer = [p for g in trainer.opt_backbone.param_groups for p in g["params"]]
    assert {id(p) for p in in_optimizer} == {id(p) for p in trainable}
    assert [g["weight_decay"] for g in trainer.opt_backbone.param_groups] == [5e-4, 0.0]
    batches = list(_ImageLoader(16, 4, classes))
    for i in range(3):
        trainer.train_step([batches[i]])
        bb = [g["lr"] for g in trainer.opt_backbone.param_groups]
        assert bb == pytest.approx([0.1 * trainer.opt_head.param_groups[0]["lr"]] * 2)
    frozen_prefixes = ("layers.0.", "layers.1.", "layers.2.")
    for key, before in state0.items():
        after = backbone.state_dict()[key]
        if key.endswith("num_batches_tracked"):
            continue
        frozen = key.startswith(frozen_prefixes)
        bn_stat = key.endswith(("running_mean", "running_var"))
        should_stay = frozen or (bn_stats and bn_stat)
        assert torch.equal(before, after) == should_stay, key


# ------------------------------------------------------------------ weight decay
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.PReLU)


@pytest.mark.parametrize("network", ["r18", "mbf", "vit_t"])
def test_weight_decay_groups(network: str) -> None:
    """The no-decay group is exactly the parameters of BatchNorm, LayerNorm and PReLU
    modules plus every bias (found by module type here); the rest decays."""
    model = get_model(network)
    reference = set()
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            if isinstance(module, _NORMS) or pname == "bias":
                reference.add(f"{mname}.{pname}" if mname else pname)
    cfg = _cfg("/tmp/unused", "optimizer.weight_decay_exclude_norm_bias=true").optimizer
    decay, rest = backbone_param_groups(model, cfg)
    name_of = {id(p): n for n, p in model.named_parameters()}
    no_decay = {name_of[id(p)] for p in rest["params"]}
    decayed = {name_of[id(p)] for p in decay["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert no_decay == reference & trainable and decayed == trainable - reference
    assert no_decay and decayed
    assert (decay["weight_decay"], rest["weight_decay"]) == (5e-4, 0.0)
    # the default decays everything, as arcface_torch does
    (only,) = backbone_param_groups(model, _cfg("/tmp/unused").optimizer)
    assert len(only["params"]) == len(trainable) and "weight_decay" not in only


# -------------------------------------------------------------------- imprinting
IN_DIM, EMB, CLASSES, K, N, B = 6, 5, 7, 2, 23, 3  # class 6 has no image


def _imprint_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(11)
    backbone = nn.Sequential(nn.Linear(IN_DIM, 8), nn.Tanh(), nn.Linear(8, EMB))
    x = torch.randn(N, IN_DIM)
    y = torch.randint(0, CLASSES - 1, (N,))
    return backbone, x, y


def _imprint_rank(rank: int, world: int) -> tuple[torch.Tensor, int, int]:
    """Rank ``rank``'s part, as the imprint loader deals it: position ``step * world * B
    + rank * B + j``, wrapped around past N and then marked invalid."""
    backbone, x, y = _imprint_data()
    head = PartialFC(CLASSES, EMB, ArcFace(16.0, 0.3), num_subcenters=K, seed=5)
    steps = -(-N // (world * B))

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for step in range(steps):
            pos = step * world * B + rank * B + torch.arange(B)
            yield x[pos % N], y[pos % N], pos < N

    count = imprint_head(backbone, head, batches(), pad_to=B)
    return head.weight.detach().clone(), head.class_start, count


def _imprint_reference() -> torch.Tensor:
    """Dense float64: sub-centre 0 = normalize(sum of normalised embeddings), the others
    nudged by SUBCENTER_JITTER x their own normalised random row, each scaled to its
    random row's norm; empty classes random."""
    backbone, x, y = _imprint_data()
    with torch.no_grad():
        emb = backbone.double()(x.double())
    unit = emb / emb.norm(dim=1, keepdim=True)
    random = PartialFC(CLASSES, EMB, ArcFace(16.0, 0.3), num_subcenters=K, seed=5).weight
    random = random.detach().double().view(CLASSES, K, EMB)
    out = random.clone()
    for c in range(CLASSES):
        rows = unit[y == c]
        if len(rows) == 0:
            continue
        mean = rows.sum(0) / rows.sum(0).norm()
        out[c, 0] = mean * random[c, 0].norm()
        for k in range(1, K):
            nudged = mean + SUBCENTER_JITTER * random[c, k] / random[c, k].norm()
            out[c, k] = nudged / nudged.norm() * random[c, k].norm()
    return out.view(CLASSES * K, EMB)


def test_imprinting_matches_a_dense_float64_reference_on_1_and_2_ranks() -> None:
    expected = _imprint_reference()
    weight, _, count = _imprint_rank(0, 1)
    assert count == CLASSES - 1
    torch.testing.assert_close(weight.double(), expected, atol=1e-6, rtol=0)
    shards = run_ranks(_imprint_rank, 2)
    assert [s[1] for s in shards] == [0, 4]  # uneven shards: classes 0-3 and 4-6
    assert all(s[2] == CLASSES - 1 for s in shards)
    torch.testing.assert_close(
        torch.cat([s[0] for s in shards]).double(), expected, atol=1e-6, rtol=0
    )


# ------------------------------------------------------------- end to end (build)
IDS, PER_ID = 4, 6


def test_init_from_and_imprint_end_to_end(synthetic_data, tmp_path: Path) -> None:
    """build_trainer on a real (synthetic) dataset: the backbone is the init_from file's
    (saved with DDP prefixes), the head is imprinted from every training image once;
    a resume (with a frozen stem and two backbone groups to restore) ignores
    init_from (its file is gone by then); weights of another
    embedding size are refused naming the file, the first mismatching key and both
    shapes, before anything is written."""
    from datasets.discovery import open_dataset

    data = synthetic_data(IDS, PER_ID, 4, 2, seed=1)
    out = tmp_path / "run"
    args = [
        "model.network=mbf_tiny",
        "model.embedding_size=32",
        f"data.root={data}",
        f"data.num_classes={IDS}",
        f"data.num_images={IDS * PER_ID}",
        "data.batch_size=5",  # 24 images: the last batch wraps around by one
        "data.num_workers=0",
        "eval.targets=[]",
        "train.max_steps=2",
        "head.init=imprint",
        # the resume below then restores two backbone groups without the frozen stem
        "model.freeze_stem=true",
        "optimizer.backbone_lr_mult=0.5",
        "optimizer.weight_decay_exclude_norm_bias=true",
    ]
    torch.manual_seed(123)
    pretrained = get_model("mbf_tiny", embedding_size=32)
    with torch.no_grad():  # not the state build_trainer's seed would give
        for p in pretrained.parameters():
            p.add_(0.01)
    init = tmp_path / "pretrained.pth"
    torch.save({f"module.{k}": v for k, v in pretrained.state_dict().items()}, init)

    cfg = _cfg(out, *args, f"model.init_from={init}")
    trainer = build_trainer(cfg, DistContext())
    loaded = trainer.backbone.state_dict()
    for key, value in pretrained.state_dict().items():
        assert torch.equal(loaded[key], value), key
    # reference: every training image once, unflipped, through the pretrained backbone
    dataset = open_dataset(data, flip=False)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():  # the network runs in fp32 (its head casts); the means in fp64
        emb = F.normalize(pretrained.eval()(images).double(), dim=1)
    sums = torch.zeros(IDS, 32, dtype=torch.float64).index_add_(0, labels, emb)
    random = PartialFC(IDS, 32, ArcFace(32.0, 0.3), seed=cfg.train.seed).weight.detach()
    expected = F.normalize(sums, dim=1) * random.double().norm(dim=1, keepdim=True)
    # The same fp32 embeddings; the imprint's fp32 class sums of n unit rows and the two
    # normalisations carry gamma_{n + 40} of the sum of magnitudes (n), amplified by
    # n / |sum| when the rows disagree, on a row of the random row's norm.
    counts = torch.zeros(IDS, dtype=torch.float64).index_add_(
        0, labels, torch.ones(len(labels)).double()
    )
    condition = counts / sums.norm(dim=1).clamp_min(1e-300)
    atol = gamma(int(counts.max()) + 40, torch.float32) * float(
        (condition * random.double().norm(dim=1)).max()
    )
    torch.testing.assert_close(trainer.head.weight.detach().double(), expected, atol=atol, rtol=0)

    trainer.fit()
    init.unlink()  # the resume must not need it
    resumed = build_trainer(cfg, DistContext())
    assert resumed.step == 2
    head_lr = resumed.opt_head.param_groups[0]["lr"]
    assert [g["lr"] for g in resumed.opt_backbone.param_groups] == [0.5 * head_lr] * 2
    # a checkpoint directory as init_from: a new run starts from its backbone
    step_dir = out / "checkpoints" / "step-00000002"
    again = build_trainer(
        _cfg(tmp_path / "again", *args, f"model.init_from={step_dir}"), DistContext()
    )
    assert again.step == 0
    final = torch.load(out / "backbone.pt", weights_only=True)
    for key, value in resumed.backbone.state_dict().items():
        assert torch.equal(value, final[key]), key
        assert torch.equal(again.backbone.state_dict()[key], final[key]), key

    other = get_model("mbf_tiny", embedding_size=64)
    wrong = tmp_path / "wrong_size.pth"
    torch.save(other.state_dict(), wrong)
    theirs, ours = other.state_dict(), pretrained.state_dict()
    key = next(k for k in ours if theirs[k].shape != ours[k].shape)
    fresh = tmp_path / "fresh"
    with pytest.raises(ConfigError) as info:
        build_trainer(_cfg(fresh, *args, f"model.init_from={wrong}"), DistContext())
    message = str(info.value)
    assert message.startswith("model.init_from:") and str(wrong) in message and key in message
    assert str(tuple(theirs[key].shape)) in message and str(tuple(ours[key].shape)) in message
    assert not (fresh / "checkpoints").exists() or not any((fresh / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match=r"model\.init_from: .*does not exist"):
        build_trainer(_cfg(fresh, *args, f"model.init_from={tmp_path / 'nope.pth'}"), DistContext())
