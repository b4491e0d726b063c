"""Typed, validated training configurations and presets.

Use :func:`load_config` with a preset name (see :func:`preset_names`) or a
``.json``/``.toml`` file, plus dotted ``key=value`` overrides::

    cfg = load_config("ms1mv2_r50", ["optimizer.lr=0.05", "data.root=/data/ms1m"])
"""

from configs.loading import (
    config_to_dict,
    describe,
    load_config,
    load_preset,
    preset_names,
    save_config,
)
from configs.overrides import apply_overrides, closest_key, set_key, valid_keys
from configs.schema import (
    AuxLossConfig,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    DistillConfig,
    EvalConfig,
    HeadConfig,
    LogConfig,
    ModelConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainConfig,
)

__all__ = [
    "AuxLossConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "EvalConfig",
    "HeadConfig",
    "LogConfig",
    "ModelConfig",
    "OptimizerConfig",
    "SchedulerConfig",
    "TrainConfig",
    "apply_overrides",
    "closest_key",
    "config_to_dict",
    "describe",
    "load_config",
    "load_preset",
    "preset_names",
    "save_config",
    "set_key",
    "valid_keys",
]
