"""Face-recognition backbones (IResNet, MobileFaceNet, ViT) behind one registry.

>>> from backbones import get_model
>>> model = get_model("r50", embedding_size=512)   # (B, 3, 112, 112) -> (B, 512)

Parameter names and shapes are arcface_torch's: its ``backbone.pth`` files load with
``load_backbone_weights`` (or ``strict=True``), and ours load into its code. A model
folder written by ``python -m eval.export`` loads with ``from_pretrained(MODEL_DIR)``. See
``docs/backbones.md`` for the models, their options, their sizes and the weight files.
"""

from backbones.flops import count_macs, count_parameters
from backbones.groups import BackboneParts, GroupMatcher
from backbones.norm import freeze_batchnorm
from backbones.pretrained import ModelFolderError, from_pretrained, is_model_folder
from backbones.registry import get_model, group_matcher, input_spec, list_models
from backbones.weights import (
    BackboneWeightsError,
    load_backbone_weights,
    read_backbone_weights,
    save_backbone_weights,
)

__all__ = [
    "BackboneParts",
    "BackboneWeightsError",
    "GroupMatcher",
    "ModelFolderError",
    "count_macs",
    "count_parameters",
    "freeze_batchnorm",
    "from_pretrained",
    "get_model",
    "group_matcher",
    "input_spec",
    "is_model_folder",
    "list_models",
    "load_backbone_weights",
    "read_backbone_weights",
    "save_backbone_weights",
]
