"""Configuration: presets, overrides, validation messages, save/load round trip."""

from __future__ import annotations

import json

import pytest

from configs import (
    Config,
    ConfigError,
    describe,
    load_config,
    load_preset,
    preset_names,
    save_config,
    valid_keys,
)

REQUIRED_PRESETS = {
    "ms1mv2_r50",
    "ms1mv2_r100",
    "ms1mv3_r50",
    "ms1mv3_r100",
    "glint360k_r100",
    "webface42m_r100_pfc02",
    "webface42m_vit_t",
    "demo",
}


def test_presets_exist_and_validate() -> None:
    assert REQUIRED_PRESETS <= set(preset_names())
    for name in preset_names():
        cfg = load_preset(name)
        assert isinstance(cfg, Config)
        cfg.validate()
    assert load_preset("glint360k_r100").head.loss == "cosface"
    assert load_preset("webface42m_r100_pfc02").head.sample_rate == 0.2
    assert load_preset("webface42m_vit_t").optimizer.name == "adamw"


@pytest.mark.parametrize("spec", ["demo", "configs/demo", "configs/demo.py"])
def test_spec_forms(spec: str) -> None:
    assert load_config(spec).name == "demo"


def test_overrides_are_typed() -> None:
    cfg = load_config(
        "ms1mv2_r50",
        [
            "optimizer.lr=0.05",
            "data.batch_size=64",
            "train.clip_grad_norm=null",
            "optimizer.betas=(0.9, 0.99)",
            "eval.targets=lfw,agedb_30",
            "log.tensorboard=false",
            "model.kwargs.dropout=0.2",
        ],
    )
    assert cfg.optimizer.lr == 0.05 and isinstance(cfg.optimizer.lr, float)
    assert cfg.data.batch_size == 64
    assert cfg.train.clip_grad_norm is None
    assert cfg.optimizer.betas == (0.9, 0.99)
    assert cfg.eval.targets == ["lfw", "agedb_30"]
    assert cfg.log.tensorboard is False
    assert cfg.model.kwargs == {"dropout": 0.2}


@pytest.mark.parametrize(
    ("override", "closest"),
    [
        ("optimizer.lrr=0.1", "optimizer.lr"),
        ("lr=0.1", "optimizer.lr"),
        ("head.sampl_rate=0.3", "head.sample_rate"),
        ("train.grad_acum=2", "train.grad_accum"),
        ("data.batchsize=3", "data.batch_size"),
    ],
)
def test_unknown_key_names_closest(override: str, closest: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("demo", [override])
    message = str(info.value)
    assert override.split("=")[0] in message
    assert f"did you mean '{closest}'" in message


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optimizer.lr=fast", "optimizer.lr"),
        ("optimizer.lr=-1", "optimizer.lr"),
        ("head.sample_rate=1.5", "head.sample_rate"),
        ("train.amp=fp8", "train.amp"),
        ("data.batch_size=2.5", "data.batch_size"),
        ("train.grad_accum=0", "train.grad_accum"),
        ("log.tensorboard=maybe", "log.tensorboard"),
        ("optimizer.betas=(0.9,)", "optimizer.betas"),
        ("optimizer.lr", "key=value"),
    ],
)
def test_bad_value_names_option(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config("demo", [override])


def test_unknown_preset_and_file_key(tmp_path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'ms1mv2_r50'"):
        load_config("ms1mv2_r5")
    bad = tmp_path / "bad.toml"
    bad.write_text('base = "demo"\n[optimizer]\nmomentun = 0.8\n')
    with pytest.raises(ConfigError, match=r"did you mean 'optimizer\.momentum'"):
        load_config(str(bad))


def test_toml_file_with_base(tmp_path) -> None:
    path = tmp_path / "my.toml"
    path.write_text('base = "ms1mv3_r50"\nname = "mine"\n[optimizer]\nlr = 0.02\n')
    cfg = load_config(str(path), ["train.epochs=3"])
    assert (cfg.name, cfg.optimizer.lr, cfg.train.epochs) == ("mine", 0.02, 3)
    assert cfg.data.num_classes == 93_431


def test_saved_config_round_trips(tmp_path) -> None:
    cfg = load_config("webface42m_vit_t", ["optimizer.lr=0.002"])
    path = save_config(cfg, tmp_path / "out")
    assert json.loads(path.read_text())["optimizer"]["lr"] == 0.002
    assert load_config(str(path)) == cfg


def test_every_field_documented() -> None:
    docs = dict(describe())
    assert set(docs) == set(valid_keys())
    missing = [key for key, doc in docs.items() if not doc]
    assert not missing, f"fields without a docstring: {missing}"


def test_head_options_reach_the_head(tmp_path) -> None:
    import torch

    from trainer.build import build_head

    margins = tmp_path / "margins.txt"
    margins.write_text("\n".join(str(0.1 + 0.01 * c) for c in range(40)))
    cfg = load_config(
        "demo",
        [
            "data.num_classes=40",
            "data.batch_size=8",
            "head.loss=arcface",
            f"head.margins_file={margins}",
            "head.easy_margin=true",
            "head.interclass_filtering_threshold=0.4",
            "head.interclass_filtering_mode=zero",
            "head.matmul_dtype=bf16",
            "head.chunk_size=16",
        ],
    )
    head = build_head(cfg, torch.device("cpu"))
    assert head.margin.easy_margin
    assert torch.allclose(head.margin.m2[:2].float(), torch.tensor([0.10, 0.11]))
    assert (head.interclass_filtering_threshold, head.interclass_filtering_mode) == (0.4, "zero")
    assert head.matmul_dtype == torch.bfloat16 and head.chunk_classes == 16
    assert head.max_local_batch == 8


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("head.interclass_filtering_threshold=1.5", "head.interclass_filtering_threshold"),
        ("head.interclass_filtering_mode=drop", "head.interclass_filtering_mode"),
        ("head.matmul_dtype=int8", "head.matmul_dtype"),
    ],
)
def test_bad_head_options_name_the_option(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config("demo", [override])
