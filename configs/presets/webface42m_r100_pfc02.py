"""WebFace42M + IResNet-100, ArcFace with Partial FC at sample rate 0.2, SGD 20 epochs."""

from configs.recipes import arcface, sgd_recipe
from configs.schema import Config


def get_config() -> Config:
    """Return the webface42m_r100_pfc02 preset."""
    cfg = sgd_recipe("webface42m_r100_pfc02", "webface42m", "r100", arcface(0.5, sample_rate=0.2))
    cfg.scheduler.warmup_epochs = 2.0
    return cfg
