"""Fine-tune a released IResNet-50 on your own identities (docs/training.md, "Fine-tuning").

Starts from backbone weights (``model.init_from``: an arcface_torch ``backbone.pth``
such as its MS1MV3 / Glint360K / WebFace r50, or a ``backbone.pt`` of this trainer),
imprints the new identities' class centres from their images, and trains the whole
network gently: the head at ``optimizer.lr`` = 0.02, the backbone at a tenth of it,
with a short warm-up and ArcFace (s=64, m=0.5) as the released models were trained.

The placeholders must be overridden::

    torchrun --nproc_per_node=8 train_dist.py configs/finetune_r50 \\
        model.init_from=backbone.pth data.root=/data/mine \\
        data.num_classes=N data.num_images=M
"""

from configs.recipes import arcface
from configs.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainConfig,
)


def get_config() -> Config:
    """Return the finetune_r50 preset."""
    head = arcface(0.5)
    head.init = "imprint"
    return Config(
        name="finetune_r50",
        model=ModelConfig(
            network="r50",
            embedding_size=512,
            init_from="/path/to/backbone.pth",  # placeholder: a missing file stops the run
        ),
        head=head,
        data=DataConfig(
            root="/data/my_identities",
            num_classes=1000,  # placeholders: checked against the data at start-up
            num_images=50_000,
            batch_size=128,
            num_workers=4,
        ),
        optimizer=OptimizerConfig(
            name="sgd", lr=0.02, momentum=0.9, weight_decay=5e-4, backbone_lr_mult=0.1
        ),
        scheduler=SchedulerConfig(warmup_epochs=0.5, warmup_start_factor=0.1, power=2.0),
        train=TrainConfig(
            epochs=10, amp="bf16", clip_grad_norm=5.0, output="work_dirs/finetune_r50"
        ),
        checkpoint=CheckpointConfig(every_steps=1000),
        # a custom set has no lfw.bin beside it: name the .bin files to verify on
        eval=EvalConfig(targets=[], every_steps=1000),
    )
