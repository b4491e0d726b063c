"""MS1MV2 + IResNet-100, MagFace (s=64, margins 0.45-0.8 over magnitudes 10-110,
lambda_g=35), full softmax, SGD 25 epochs."""

from configs.recipes import magface, sgd_recipe
from configs.schema import Config


def get_config() -> Config:
    """Return the ms1mv2_r100_magface preset."""
    return sgd_recipe("ms1mv2_r100_magface", "ms1mv2", "r100", magface(), epochs=25)
