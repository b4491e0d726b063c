"""WebFace42M + ViT-Tiny, ArcFace with Partial FC 0.3, AdamW 40 epochs (transformer recipe)."""

from configs.recipes import DATASETS, arcface
from configs.schema import (
    Config,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainConfig,
)


def get_config() -> Config:
    """Return the webface42m_vit_t preset."""
    num_classes, num_images = DATASETS["webface42m"]
    return Config(
        name="webface42m_vit_t",
        model=ModelConfig(network="vit_t", embedding_size=512),
        head=arcface(0.5, sample_rate=0.3),
        data=DataConfig(
            root="/data/webface42m",
            num_classes=num_classes,
            num_images=num_images,
            batch_size=256,
            num_workers=4,
        ),
        optimizer=OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.999)),
        scheduler=SchedulerConfig(warmup_epochs=4.0, warmup_start_factor=0.01, power=2.0),
        train=TrainConfig(
            epochs=40, amp="bf16", clip_grad_norm=5.0, output="work_dirs/webface42m_vit_t"
        ),
    )
