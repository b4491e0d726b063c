"""MS1MV2 + IResNet-50, ArcFace (s=64, m=0.5), full softmax, SGD 20 epochs."""

from configs.recipes import arcface, sgd_recipe
from configs.schema import Config


def get_config() -> Config:
    """Return the ms1mv2_r50 preset."""
    return sgd_recipe("ms1mv2_r50", "ms1mv2", "r50", arcface(0.5))
