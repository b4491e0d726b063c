"""Glint360K + IResNet-100, CosFace (s=64, m=0.4), full softmax, SGD 20 epochs."""

from configs.recipes import cosface, sgd_recipe
from configs.schema import Config


def get_config() -> Config:
    """Return the glint360k_r100 preset."""
    return sgd_recipe("glint360k_r100", "glint360k", "r100", cosface(0.4))
