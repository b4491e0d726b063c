"""WebFace4M + IResNet-50, AdaFace (s=64, m=0.4, h=0.333), its augmentations
(crop, low resolution, photometric, each with probability 0.2), SGD 26 epochs."""

import dataclasses

from configs.recipes import adaface, sgd_recipe
from configs.schema import AugmentConfig, Config


def get_config() -> Config:
    """Return the webface4m_r50_adaface preset."""
    cfg = sgd_recipe("webface4m_r50_adaface", "webface4m", "r50", adaface(0.4), epochs=26)
    augment = AugmentConfig(crop_prob=0.2, lowres_prob=0.2, photometric_prob=0.2)
    return dataclasses.replace(cfg, augment=augment)
