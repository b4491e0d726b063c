"""Name -> constructor registry behind :func:`get_model`, with each model's facts.

The table below is static (nothing is registered at import time). Every
constructor accepts ``embedding_size`` and ``checkpoint`` keyword arguments;
further keywords are those of the model class (see ``docs/backbones.md``). Each
model's family gives its input (:func:`input_spec`, read by training, evaluation and
ONNX export) and how its parameters group into stem, units and head
(:func:`group_matcher`, read by freezing).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from backbones.groups import IRESNET_GROUPS, MOBILEFACENET_GROUPS, VIT_GROUPS, GroupMatcher
from backbones.iresnet import iresnet
from backbones.mobilefacenet import MobileFaceNet
from backbones.norm import freeze_batchnorm
from backbones.vit import VisionTransformer
from common.face_input import ARCFACE_INPUT, InputSpec

_MODELS: dict[str, Callable[..., nn.Module]] = {
    "r18": partial(iresnet, 18),
    "r34": partial(iresnet, 34),
    "r50": partial(iresnet, 50),
    "r100": partial(iresnet, 100),
    "r200": partial(iresnet, 200),
    # insightface's MobileFaceNet: stage 0 is a 3x3 conv with groups=64 (two input
    # channels per group); depthwise_stage0=True gives the fully depthwise variant
    "mbf": partial(MobileFaceNet, blocks=(1, 4, 6, 2), scale=2),
    "mbf_large": partial(MobileFaceNet, blocks=(2, 8, 12, 4), scale=4),
    # the CPU demo model: mbf at a quarter of the width (~0.2M params, ~31M MACs), with
    # the fully depthwise stage 0 it has always had (its checkpoints keep loading)
    "mbf_tiny": partial(
        MobileFaceNet, blocks=(1, 4, 6, 2), scale=2, width_mult=0.25, depthwise_stage0=True
    ),
    # arcface_torch's vit_t, vit_s, vit_b and vit_l (its "vit_l_dp005_mask_005")
    "vit_t": partial(VisionTransformer, dim=256, depth=12, num_heads=8),
    "vit_s": partial(VisionTransformer, dim=512, depth=12, num_heads=8),
    "vit_b": partial(VisionTransformer, dim=512, depth=24, num_heads=8),
    "vit_l": partial(
        VisionTransformer, dim=768, depth=24, num_heads=8, drop_path_rate=0.05, mask_ratio=0.05
    ),
}

#: The model family of each constructor (``iresnet``, ``mbf``, ``vit``).
_FAMILIES = {iresnet: "iresnet", MobileFaceNet: "mbf", VisionTransformer: "vit"}

#: Each family's input and parameter groups. Every family reads arcface_torch's input.
_FAMILY_FACTS: dict[str, tuple[InputSpec, GroupMatcher]] = {
    "iresnet": (ARCFACE_INPUT, IRESNET_GROUPS),
    "mbf": (ARCFACE_INPUT, MOBILEFACENET_GROUPS),
    "vit": (ARCFACE_INPUT, VIT_GROUPS),
}


def list_models() -> list[str]:
    """Names accepted by :func:`get_model`, in registry order."""
    return list(_MODELS)


def model_family(name: str) -> str:
    """``iresnet``, ``mbf`` or ``vit``: the model class behind ``name``.

    Raises:
        ValueError: for an unknown ``name``.
    """
    builder = _builder(name)
    assert isinstance(builder, partial)
    return _FAMILIES[builder.func]


def input_spec(name: str) -> InputSpec:
    """The input model ``name`` reads (side, pixel normalisation, colour order).

    Raises:
        ValueError: for an unknown ``name``.
    """
    return _FAMILY_FACTS[model_family(name)][0]


def group_matcher(name: str) -> GroupMatcher:
    """Which part (stem, unit, head) each parameter of model ``name`` belongs to.

    Raises:
        ValueError: for an unknown ``name``.
    """
    return _FAMILY_FACTS[model_family(name)][1]


def _builder(name: str) -> Callable[..., nn.Module]:
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(_MODELS)}") from None


def get_model(name: str, *, freeze_bn: bool = False, **kwargs: Any) -> nn.Module:
    """Build a backbone by name.

    Every model maps ``(B, 3, 112, 112)`` float images in [-1, 1] (its
    :func:`input_spec`) to ``(B, embedding_size)`` float32 embeddings (default 512, not
    normalised).

    Args:
        name: one of :func:`list_models`.
        freeze_bn: replace all BatchNorm layers by frozen ones that always use
            their running statistics (see :mod:`backbones.norm`).
        **kwargs: constructor arguments, e.g. ``embedding_size=512``,
            ``checkpoint=True`` (activation checkpointing), ``dropout`` (IResNet),
            ``width_mult``/``depthwise_stage0`` (MobileFaceNet),
            ``mask_ratio``/``drop_path_rate`` (ViT).
            These override the registry's defaults for ``name``.

    Raises:
        ValueError: for an unknown ``name``.
        TypeError: for a keyword the model does not accept.
    """
    model = _builder(name)(**kwargs)
    return freeze_batchnorm(model) if freeze_bn else model
