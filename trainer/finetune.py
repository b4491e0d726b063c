"""Fine-tuning: start a new run from pretrained backbone weights (docs/training.md,
"Fine-tuning").

* :func:`load_init_weights`: ``model.init_from``, loaded strictly by
  :func:`backbones.weights.load_backbone_weights` (this project's or arcface_torch's
  names, DDP prefixes stripped).
* :func:`freeze_backbone`: ``model.freeze_stem``, ``model.freeze_units`` and
  ``model.freeze_bn_stats``. The stem and the residual units are those of the network's
  registry entry (:func:`backbones.registry.group_matcher`, by parameter name).
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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from backbones.groups import BackboneParts
from backbones.norm import freeze_batchnorm
from backbones.registry import group_matcher, model_family
from backbones.weights import load_backbone_state, read_backbone_weights
from common.dist import DistContext
from configs import ConfigError, ModelConfig, OptimizerConfig
from datasets.loader import FaceLoader
from partial_fc.collectives import all_reduce_
from partial_fc.imprint import ImprintAccumulator, imprint_

log = logging.getLogger("trainer")


# ------------------------------------------------------------------------ parts
def backbone_parts(names: Sequence[str], network: str) -> BackboneParts:
    """The stem, units and head among ``names`` (``named_parameters()`` order) of model
    ``network``, by its registry entry's :func:`backbones.registry.group_matcher`;
    raises :class:`ConfigError` naming ``model.freeze_*`` for a name in none of them."""
    try:
        return group_matcher(network).parts(names)
    except ValueError as exc:
        raise ConfigError(
            f"model.freeze_stem / model.freeze_units: cannot split model.network={network!r} "
            f"into stem, units and head: {exc}"
        ) from None


# ---------------------------------------------------------------------- freezing
@dataclass
class FreezeReport:
    """What :func:`freeze_backbone` froze."""

    family: str | None = None
    """The model family whose parts were frozen (``None`` when neither stem nor units
    were)."""
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
    groups = group_matcher(cfg.network) if cfg.freeze_stem or cfg.freeze_units else None
    if groups is not None:
        names = [n for n, _ in backbone.named_parameters()]
        parts = backbone_parts(names, cfg.network)
        report.family, report.num_units = model_family(cfg.network), len(parts.units)
        if cfg.freeze_units > len(parts.units):
            raise ConfigError(
                f"model.freeze_units={cfg.freeze_units}: model.network={cfg.network!r} has "
                f"{len(parts.units)} residual units"
            )
        frozen_parts = {"stem", *parts.units[: cfg.freeze_units]}
        report.frozen_params = []
        for name, param in backbone.named_parameters():
            if groups.group(name) in frozen_parts:
                param.requires_grad_(False)
                report.frozen_params.append(name)
        if not any(p.requires_grad for p in backbone.parameters()):
            raise ConfigError(
                f"model.freeze_units={cfg.freeze_units}: freezes every parameter of "
                f"model.network={cfg.network!r}; nothing would train"
            )

    def frozen_norm(name: str) -> bool:
        inside = groups is not None and groups.group(f"{name}.running_mean") in frozen_parts
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
