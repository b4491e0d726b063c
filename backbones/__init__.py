"""Face-recognition backbones (IResNet, MobileFaceNet, ViT) behind one registry.

>>> from backbones import get_model
>>> model = get_model("r50", embedding_size=512)   # (B, 3, 112, 112) -> (B, 512)

See ``docs/backbones.md`` for the models, their options and their sizes.
"""

from backbones.flops import count_macs, count_parameters
from backbones.norm import freeze_batchnorm
from backbones.registry import get_model, list_models

__all__ = ["count_macs", "count_parameters", "freeze_batchnorm", "get_model", "list_models"]
