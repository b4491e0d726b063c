"""Fine-tuning: start a new run from pretrained backbone weights (docs/training.md,
"Fine-tuning").

* :func:`load_init_weights`: ``model.init_from``, loaded strictly by
  :func:`backbones.weights.load_backbone_weights` (this project's or arcface_torch's
  names, DDP prefixes stripped).
* :func:`freeze_backbone`: ``model.freeze_stem``, ``model.freeze_units`` and
  ``model.freeze_bn_stats``. The stem and the residual units are found by parameter
  name (:data:`LAYOUTS`: arcface_torch's names, which every backbone here uses), not
  by network name, so any depth or width of a family is covered.
* :func:`backbone_param_groups`: ``optimizer.backbone_lr_mult`` and
  ``optimizer.weight_decay_exclude_norm_bias`` as optimizer parameter groups.
* :func:`imprint_head`: ``head.init=imprint``, one rank-parallel pass over the
  training data (the sharded accumulation is :mod:`partial_fc.imprint`).

All of it runs once, at start-up: nothing here is on the training step's path.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from backbones.norm import freeze_batchnorm
from backbones.weights import load_backbone_state, read_backbone_weights
from common.dist import DistContext
from configs import ConfigError, ModelConfig, OptimizerConfig
from datasets.loader import FaceLoader
from partial_fc.collectives import all_reduce_
from partial_fc.imprint import ImprintAccumulator, imprint_

log = logging.getLogger("trainer")


# ----------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class UnitLayout:
    """How one backbone layout names its stem and its residual units.

    ``stem`` full-matches the names (parameters and buffers) of the stem; each pattern
    of ``units`` is tried in turn, and the first that full-matches a name gives, as its
    group 1, the prefix of the unit the name belongs to. Units are ordered by their
    first appearance in ``named_parameters()`` (registration order, which is forward
    order in every backbone here).
    """

    name: str
    stem: str
    units: tuple[str, ...]

    def part_of(self, name: str) -> str | None:
        """``"stem"``, the unit prefix of ``name``, or ``None`` (neither)."""
        if re.fullmatch(self.stem, name):
            return "stem"
        for pattern in self.units:
            match = re.fullmatch(pattern, name)
            if match:
                return match.group(1)
        return None


#: Known layouts, tried in order (the first whose stem and units both match wins).
#: Facts from arcface_torch's backbones: iresnet ``conv1``/``bn1``/``prelu`` then
#: ``layer1..4.<i>``; MobileFaceNet ``layers.0`` (stem), then ``layers.1..7``, where a
#: ``Residual`` holds its units as ``layers.<i>.layers.<j>`` (each a ``DepthWise`` of
#: ``ConvBlock``s, whose own children are ``layers.<k>`` too: a unit inside a Residual
#: has four ``layers`` levels down to a parameter); ViT ``patch_embed``/``pos_embed``,
#: then ``blocks.<i>``.
LAYOUTS: tuple[UnitLayout, ...] = (
    UnitLayout("arcface_torch iresnet", r"(conv1|bn1|prelu)\.[^.]+", (r"(layer[1-4]\.\d+)\..+",)),
    UnitLayout(
        "arcface_torch mobilefacenet",
        r"layers\.0\..+",
        (r"(layers\.\d+\.layers\.\d+)\.layers\.\d+\.layers\.\d+\.[^.]+", r"(layers\.\d+)\..+"),
    ),
    UnitLayout("vit", r"(patch_embed\..+|pos_embed)", (r"(blocks\.\d+)\..+",)),
)


@dataclass(frozen=True)
class BackboneParts:
    """The stem and residual units of one backbone, found by :func:`backbone_parts`."""

    layout: UnitLayout
    stem: list[str]
    """Parameter names of the stem."""
    units: list[str]
    """Unit prefixes in forward order (``units.3``, ``layer2.0``, ``blocks.7``, ...)."""


def backbone_parts(names: Sequence[str], network: str = "the backbone") -> BackboneParts:
    """Find the stem and the residual units among ``names`` (``named_parameters()``
    order); raises :class:`ConfigError` naming ``model.freeze_*`` when no layout of
    :data:`LAYOUTS` matches both."""
    for layout in LAYOUTS:
        stem = [n for n in names if layout.part_of(n) == "stem"]
        units: dict[str, None] = {}
        for n in names:
            part = layout.part_of(n)
            if part is not None and part != "stem":
                units.setdefault(part, None)
        if stem and units:
            return BackboneParts(layout, stem, list(units))
    raise ConfigError(
        f"model.freeze_stem / model.freeze_units: cannot find the stem and residual units "
        f"of {network} (its parameter names, e.g. {', '.join(list(names)[:4])}, match none "
        f"of the known layouts: {', '.join(layout.name for layout in LAYOUTS)})"
    )


# ---------------------------------------------------------------------- freezing
@dataclass
class FreezeReport:
    """What :func:`freeze_backbone` froze."""

    layout: str | None = None
    """Name of the layout used (``None`` when neither stem nor units were frozen)."""
    num_units: int = 0
    """Residual units the backbone has (0 if not looked up)."""
    frozen_params: list[str] | None = None
    """Names of the parameters made ``requires_grad=False``."""
    eval_norms: list[str] | None = None
    """Names of the BatchNorm modules frozen (running statistics fixed)."""


def freeze_backbone(backbone: nn.Module, cfg: ModelConfig) -> FreezeReport:
    """Apply ``model.freeze_stem``, ``model.freeze_units`` and ``model.freeze_bn_stats``.

    Frozen parameters get ``requires_grad=False`` (the optimizer and DDP then leave
    them out: call this before both are built). BatchNorm layers inside the frozen
    parts, and every BatchNorm layer with ``freeze_bn_stats``, become
    :class:`backbones.norm.FrozenBatchNorm` (the one way this project freezes BatchNorm):
    their running statistics are used in training too and never change, their scale and
    shift keep their ``requires_grad``, and ``state_dict`` keys are unchanged.
    """
    report = FreezeReport()
    frozen_parts: set[str] = set()
    layout: UnitLayout | None = None
    if cfg.freeze_stem or cfg.freeze_units:
        names = [n for n, _ in backbone.named_parameters()]
        parts = backbone_parts(names, f"model.network={cfg.network!r}")
        layout = parts.layout
        report.layout, report.num_units = layout.name, len(parts.units)
        if cfg.freeze_units > len(parts.units):
            raise ConfigError(
                f"model.freeze_units={cfg.freeze_units}: model.network={cfg.network!r} has "
                f"{len(parts.units)} residual units"
            )
        frozen_parts = {"stem", *parts.units[: cfg.freeze_units]}
        report.frozen_params = []
        for name, param in backbone.named_parameters():
            if layout.part_of(name) in frozen_parts:
                param.requires_grad_(False)
                report.frozen_params.append(name)
        if not any(p.requires_grad for p in backbone.parameters()):
            raise ConfigError(
                f"model.freeze_units={cfg.freeze_units}: freezes every parameter of "
                f"model.network={cfg.network!r}; nothing would train"
            )

    def frozen_norm(name: str) -> bool:
        inside = layout is not None and layout.part_of(f"{name}.running_mean") in frozen_parts
        return cfg.freeze_bn_stats or inside

    report.eval_norms = [
        name
        for name, module in backbone.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and frozen_norm(name)
    ]
    freeze_batchnorm(backbone, frozen_norm)
    return report


# --------------------------------------------------------------- optimizer groups
def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """timm's ``param_groups_weight_decay`` rule: normalisation scales and shifts,
    PReLU slopes and biases (every tensor with at most one dimension, or named
    ``*.bias``) take no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias")


def backbone_param_groups(backbone: nn.Module, cfg: OptimizerConfig) -> list[dict[str, Any]]:
    """The backbone's trainable parameters as optimizer groups.

    Every group's ``lr`` is ``optimizer.lr * optimizer.backbone_lr_mult`` (the LR
    scheduler multiplies each group's own peak, so the schedule covers it). One group
    with ``optimizer.weight_decay`` by default (arcface_torch); with
    ``optimizer.weight_decay_exclude_norm_bias`` two, always in this order: decayed,
    then :func:`no_weight_decay` parameters with ``weight_decay=0`` (the group count
    is fixed by the configuration, so a checkpoint's optimizer state always fits).
    """
    lr = cfg.lr * cfg.backbone_lr_mult
    named = [(n, p) for n, p in backbone.named_parameters() if p.requires_grad]
    if not cfg.weight_decay_exclude_norm_bias:
        return [{"params": [p for _, p in named], "lr": lr}]
    decay = [p for n, p in named if not no_weight_decay(n, p)]
    rest = [p for n, p in named if no_weight_decay(n, p)]
    return [
        {"params": decay, "lr": lr, "weight_decay": cfg.weight_decay},
        {"params": rest, "lr": lr, "weight_decay": 0.0},
    ]


# ------------------------------------------------------------------ init weights
def load_init_weights(backbone: nn.Module, path: str) -> None:
    """Load ``model.init_from`` into ``backbone`` strictly, on every rank, with
    :func:`backbones.weights.load_backbone_weights` (this project's or arcface_torch's
    names, DDP ``module.`` prefixes stripped, ``.pt``/``.pth``/``.safetensors``).

    A trainer checkpoint directory (``<output>/checkpoints/step-XXXXXXXX``) stands for
    its ``trainer.pt``, whose ``backbone`` entry the loader finds.

    Raises :class:`ConfigError` naming ``model.init_from`` and the file: a missing file,
    weights of another architecture or embedding size (then the loader's message names
    the first mismatching key and both shapes), or weights holding NaN or Inf values
    (naming the first such key: they would make every step non-finite, which would look
    like bad data); the backbone is then unchanged.
    """

    source = Path(path)
    if source.is_dir() and (source / "trainer.pt").is_file():
        source = source / "trainer.pt"
    if not source.is_file():
        what = (
            "is a directory without trainer.pt (give a weights file or a checkpoint directory)"
            if source.is_dir()
            else "does not exist"
        )
        raise ConfigError(f"model.init_from: {path!r} {what}")
    try:
        state = read_backbone_weights(source)
        bad = [
            key
            for key, value in state.items()
            if isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and not bool(torch.isfinite(value).all())
        ]
        if bad:
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise ConfigError(
                f"model.init_from: {source} holds NaN/Inf values in {bad[0]!r}{more}: not "
                "usable weights (saved from a diverged run?); give a checkpoint or weights "
                "file with finite values"
            )
        load_backbone_state(backbone, state, str(source))
    except ConfigError:
        raise
    except (ValueError, KeyError, RuntimeError, OSError, EOFError) as exc:
        text = str(exc).strip()
        message = text.splitlines()[0] if text else type(exc).__name__
        if str(source) not in message and source.name not in message:
            message = f"{source}: {message}"
        raise ConfigError(f"model.init_from: {message}") from None


# --------------------------------------------------------------------- imprinting
Batches = Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
"""``(images (b, 3, H, W), labels (b,), valid (b,) bool or None)`` per local batch."""


@torch.no_grad()
def imprint_head(
    backbone: nn.Module,
    head: nn.Module,
    batches: Batches,
    *,
    pad_to: int | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> int:
    """``head.init=imprint``: set the head's centres to the normalised mean embedding of
    their classes (:mod:`partial_fc.imprint` for the definition and the sharding).

    A collective: every rank passes its own part of the data, the same number of
    batches. The backbone runs in eval mode without gradients (its mode is restored).
    Returns the number of classes imprinted over all ranks.
    """

    device = head.weight.device
    acc = ImprintAccumulator(
        head.num_classes, head.embedding_size, head.group, pad_to=pad_to, device=device
    )
    was_training = backbone.training
    backbone.eval()
    try:
        for images, labels, valid in batches:
            with autocast():
                embeddings = backbone(images.to(device))
            acc.add(embeddings.float(), labels.to(device), None if valid is None else valid)
    finally:
        backbone.train(was_training)
    seen = torch.tensor([imprint_(head.weight, acc.means(), acc.counts)], device=device)
    return int(all_reduce_(seen, dist.ReduceOp.SUM, head.group).item())


def imprint_batches(
    loader: Any, batch_size: int, num_workers: int, ctx: DistContext
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """This rank's part of the training set for :func:`imprint_head`: every image once,
    in dataset order, not flipped, ``batch_size`` per batch.

    ``loader`` is the training :class:`datasets.loader.FaceLoader` (its dataset is
    reused, whatever its sampler). Every rank yields the same number of batches: the last global
    batch is filled by wrapping around to the start, and ``valid`` marks those filler
    rows False (global position ``step * world * batch + rank * batch + j >= N``).
    """

    dataset = copy.copy(loader.dataset)
    dataset.flip = False
    rank, world, device = ctx.rank, ctx.world_size, ctx.device
    ordered = FaceLoader(
        dataset,
        batch_size,
        rank=rank,
        world_size=world,
        num_workers=num_workers,
        device=device,
        drop_last=False,
        shuffle=False,
    )
    total = len(dataset)
    offsets = torch.arange(batch_size, device=device)
    try:
        for step, (images, labels) in enumerate(ordered):
            start = step * world * batch_size + rank * batch_size
            yield images, labels, (start + offsets) < total
    finally:
        del ordered  # stop its workers now, not at the next garbage collection


def init_new_run(trainer: Any) -> None:
    """Before step 0 of a new run (not a resumed one): ``model.init_from``, then
    ``head.init=imprint`` (which needs the loaded backbone). Every rank calls it."""
    cfg = trainer.cfg
    if cfg.model.init_from:
        load_init_weights(trainer.backbone, cfg.model.init_from)
        if trainer.ctx.is_main:
            log.info("initialised the backbone from %s", cfg.model.init_from)
    if cfg.head.init == "imprint":
        if not cfg.model.init_from and trainer.ctx.is_main:
            log.warning(
                "head.init=imprint without model.init_from: imprinting the centres with a "
                "randomly initialised backbone"
            )
        batches = imprint_batches(
            trainer.loader, cfg.data.batch_size, cfg.data.num_workers, trainer.ctx
        )
        count = imprint_head(
            trainer.backbone,
            trainer.head,
            batches,
            pad_to=cfg.data.batch_size,
            autocast=trainer.amp.autocast,
        )
        if trainer.ctx.is_main:
            log.info(
                "imprinted %d of %d class centres from the training images (the others "
                "keep their random initialisation)",
                count,
                cfg.data.num_classes,
            )
