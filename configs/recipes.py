"""Shared building blocks of the presets in ``configs/presets/`` (field-standard recipes)."""

from __future__ import annotations

from configs.schema import (
    Config,
    DataConfig,
    HeadConfig,
    ModelConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainConfig,
)

#: (num_classes, num_images) of the public training sets.
DATASETS: dict[str, tuple[int, int]] = {
    "ms1mv2": (85_742, 5_822_653),
    "ms1mv3": (93_431, 5_179_510),
    "glint360k": (360_232, 17_091_657),
    "webface42m": (2_059_906, 42_474_557),
    "webface4m": (205_990, 4_235_242),
}


def sgd_recipe(name: str, dataset: str, network: str, head: HeadConfig, epochs: int = 20) -> Config:
    """The classic 8-GPU SGD recipe: per-rank batch 128, LR 0.1, poly decay, 20 epochs."""
    num_classes, num_images = DATASETS[dataset]
    return Config(
        name=name,
        model=ModelConfig(network=network, embedding_size=512),
        head=head,
        data=DataConfig(
            root=f"/data/{dataset}",
            num_classes=num_classes,
            num_images=num_images,
            batch_size=128,
            num_workers=4,
        ),
        optimizer=OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4),
        scheduler=SchedulerConfig(warmup_epochs=1.0, warmup_start_factor=0.01, power=2.0),
        train=TrainConfig(
            epochs=epochs, amp="bf16", clip_grad_norm=5.0, output=f"work_dirs/{name}"
        ),
    )


def arcface(margin: float = 0.5, sample_rate: float = 1.0) -> HeadConfig:
    """ArcFace head (s=64, additive angular margin)."""
    return HeadConfig(loss="arcface", scale=64.0, margin=margin, sample_rate=sample_rate)


def cosface(margin: float = 0.4, sample_rate: float = 1.0) -> HeadConfig:
    """CosFace head (s=64, additive cosine margin)."""
    return HeadConfig(loss="cosface", scale=64.0, margin=margin, sample_rate=sample_rate)


def adaface(margin: float = 0.4, sample_rate: float = 1.0) -> HeadConfig:
    """AdaFace head (s=64, m=0.4, h=0.333, EMA weight 0.01: the paper's settings)."""
    return HeadConfig(
        loss="adaface", scale=64.0, margin=margin, adaface_h=0.333, ema_alpha=0.01,
        sample_rate=sample_rate,
    )  # fmt: skip


def magface(sample_rate: float = 1.0) -> HeadConfig:
    """MagFace head (s=64, l_a=10, u_a=110, l_m=0.45, u_m=0.8, lambda_g=35: the paper's)."""
    return HeadConfig(
        loss="magface", scale=64.0, magface_l_a=10.0, magface_u_a=110.0, magface_l_m=0.45,
        magface_u_m=0.8, magface_lambda_g=35.0, sample_rate=sample_rate,
    )  # fmt: skip
