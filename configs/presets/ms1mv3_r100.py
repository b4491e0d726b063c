"""MS1MV3 + IResNet-100, ArcFace (s=64, m=0.5), full softmax, SGD 20 epochs."""

from configs.recipes import arcface, sgd_recipe
from configs.schema import Config


def get_config() -> Config:
    """Return the ms1mv3_r100 preset."""
    return sgd_recipe("ms1mv3_r100", "ms1mv3", "r100", arcface(0.5))
