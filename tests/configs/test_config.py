"""Configuration: presets, overrides, validation messages, save/load round trip."""

from __future__ import annotations

import dataclasses
import json
import math
import pkgutil
import re
import sys
from pathlib import Path

import pytest

import configs
import configs.presets
from configs import (
    Config,
    ConfigError,
    DataConfig,
    config_to_dict,
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


@pytest.mark.parametrize(
    "spec",
    [
        "demo",
        "configs/demo",
        "configs/demo.py",
        "./configs/demo",
        "configs/presets/demo",
        "configs/presets/demo.py",
    ],
)
def test_spec_forms(spec: str) -> None:
    assert load_config(spec).name == "demo"


def test_presets_live_in_their_own_package() -> None:
    presets_dir = Path(configs.presets.__file__).parent
    assert presets_dir == Path(configs.__file__).parent / "presets"
    # every module of configs/presets/ is a preset (no exclusion list) ...
    assert preset_names() == sorted(
        p.stem for p in presets_dir.glob("*.py") if p.stem != "__init__"
    )
    # ... and none is left beside the configuration's own modules
    beside = [m.name for m in pkgutil.iter_modules(configs.__path__) if not m.ispkg]
    assert sorted(beside) == [
        "checks",
        "loading",
        "overrides",
        "recipes",
        "resume_policy",
        "schema",
    ]
    assert type(load_preset("ms1mv3_r50")).__module__ == "configs.schema"
    assert "configs.presets.ms1mv3_r50" in sys.modules


def test_a_new_preset_module_is_a_preset(tmp_path, monkeypatch) -> None:
    (tmp_path / "mine_r18.py").write_text(
        "from configs.presets.demo import get_config as demo\n\n"
        "def get_config():\n"
        "    cfg = demo()\n"
        "    cfg.name = 'mine_r18'\n"
        "    return cfg\n"
    )
    monkeypatch.setattr(configs.presets, "__path__", [*configs.presets.__path__, str(tmp_path)])
    try:
        assert "mine_r18" in preset_names()
        assert load_config("configs/mine_r18").name == "mine_r18"
    finally:
        sys.modules.pop("configs.presets.mine_r18", None)


def test_list_keys(capsys) -> None:
    import train_dist

    assert train_dist.main(["ms1mv3_r50", "--list-keys"]) == 0
    printed = capsys.readouterr().out
    keys = [line.split()[0] for line in printed.splitlines()]
    assert keys == valid_keys()
    assert "data.image_size" not in keys


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
    # parsed from the file's decimals into float64: exactly the nearest doubles
    assert torch.equal(head.margin.m2[:2], torch.tensor([0.10, 0.11], dtype=torch.float64))
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


@pytest.mark.parametrize(
    ("overrides", "option", "why"),
    [
        (["head.scale=0"], "head.scale", "positive finite"),
        (["head.scale=inf"], "head.scale", "positive finite"),
        (["head.scale=nan"], "head.scale", "positive finite"),
        (["head.loss=arcface", "head.margin=3.5"], "head.margin", "trains to loss 0"),
        (["head.loss=arcface", "head.margin=3.1416"], "head.margin", r"in \[0, pi\)"),
        (["head.loss=arcface", "head.margin=-0.1"], "head.margin", "rewards the target"),
        (["head.loss=cosface", "head.margin=2"], "head.margin", "below every other class"),
        (["head.loss=cosface", "head.margin=-0.1"], "head.margin", "rewards the target"),
        (["head.loss=sphereface", "head.margin=0.5"], "head.margin", "shrinks the angle"),
        (["head.loss=sphereface"], "head.margin", ">= 1"),  # the default 0.5 is arcface's
        (["head.loss=combined", "head.m1=0.5"], "head.m1", "shrinks the angle"),
        (["head.loss=combined", "head.m1=inf"], "head.m1", "finite"),
        (["head.loss=combined", "head.m2=3.5"], "head.m2", "trains to loss 0"),
        (["head.loss=combined", "head.m2=-0.2"], "head.m2", "rewards the target"),
        (["head.loss=combined", "head.m3=2.5"], "head.m3", "below every other class"),
        (["head.loss=combined", "head.m3=nan"], "head.m3", "finite"),
        (["head.sample_rate=0"], "head.sample_rate", "negative class centres"),
        (["head.sample_rate=nan"], "head.sample_rate", r"\(0, 1\]"),
        (["head.num_subcenters=0"], "head.num_subcenters", "sub-centres"),
        (["head.chunk_size=0"], "head.chunk_size", "classes per block"),
        (["head.loss=tripletface"], "head.loss", "one of"),
    ],
)
def test_bad_head_values_name_the_option_and_say_why(
    overrides: list[str], option: str, why: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(option)}: ") as info:
        load_config("demo", overrides)
    assert re.search(why, str(info.value)), str(info.value)


def test_margins_file_is_read_and_checked_at_start_up(tmp_path) -> None:
    path = tmp_path / "margins.txt"
    path.write_text("0.3\n0.4\n3.5\n")
    with pytest.raises(ConfigError, match=r"^head\.margins_file \(from .*margins\.txt\): ") as info:
        load_config("demo", [f"head.margins_file={path}"])
    assert "for class 2" in str(info.value) and "in [0, pi)" in str(info.value)
    with pytest.raises(ConfigError, match=r"^head\.margins_file: cannot read .*missing\.txt"):
        load_config("demo", [f"head.margins_file={tmp_path / 'missing.txt'}"])
    # the file replaces the kind's margin (sphereface: m1), so head.margin is not checked
    path.write_text("1.5\n4\n")
    cfg = load_config("demo", ["head.loss=sphereface", f"head.margins_file={path}"])
    assert cfg.head.margin == 0.3  # the demo's, ignored: below sphereface's 1
    path.write_text("1.5\n0.5\n")
    with pytest.raises(ConfigError, match=r"^head\.margins_file .*for class 1.*shrinks the angle"):
        load_config("demo", ["head.loss=sphereface", f"head.margins_file={path}"])


# (which margin, value, valid): the configuration and the margin classes agree on
# every one, because both run partial_fc.margins.check_margin.
MARGIN_CASES = [
    ("m1", 1.0, True),
    ("m1", 4.0, True),
    ("m1", 1.35, True),
    ("m1", 0.999, False),
    ("m1", 0.0, False),
    ("m2", 0.0, True),
    ("m2", 3.14, True),
    ("m2", math.pi, False),
    ("m2", 3.5, False),
    ("m2", -0.01, False),
    ("m3", 0.0, True),
    ("m3", 1.99, True),
    ("m3", 2.0, False),
    ("m3", -0.01, False),
]


@pytest.mark.parametrize(("which", "value", "valid"), MARGIN_CASES)
def test_config_and_margin_classes_agree(which: str, value: float, valid: bool) -> None:
    from partial_fc.margins import ArcFace, CombinedMargin, CosFace, SphereFace

    combined = {"m1": 1.0, "m2": 0.0, "m3": 0.0, which: value}
    # the kind whose ``margin`` is this one of m1/m2/m3
    loss, kind = {
        "m1": ("sphereface", SphereFace),
        "m2": ("arcface", ArcFace),
        "m3": ("cosface", CosFace),
    }[which]
    attempts = [
        (
            ["head.loss=combined", *(f"head.{k}={v!r}" for k, v in combined.items())],
            f"head.{which}",
            lambda: CombinedMargin(32.0, **combined),
            which,
        ),
        (
            [f"head.loss={loss}", f"head.margin={value!r}"],
            "head.margin",
            lambda: kind(32.0, value),
            "margin",
        ),
    ]
    for overrides, option, construct, argument in attempts:
        if valid:
            load_config("demo", overrides)
            construct()
            continue
        with pytest.raises(ConfigError, match=rf"^{re.escape(option)}: must be finite and "):
            load_config("demo", overrides)
        with pytest.raises(ValueError, match=rf"^{argument}: must be finite and "):
            construct()


def test_set_margins_checks_the_range() -> None:
    from partial_fc.margins import ArcFace, CombinedMargin

    margin = ArcFace(64.0, 0.5)
    margin.set_margins([0.1, 0.2])
    with pytest.raises(ValueError, match=r"^margin: .*got 3\.5 for class 1"):
        margin.set_margins([0.1, 3.5])
    with pytest.raises(ValueError, match=r"^m1: .*got 0\.5"):
        CombinedMargin(64.0).set_margins(0.5, "m1")


def test_image_size_is_an_unknown_key(tmp_path) -> None:
    """Images are always 112x112: ``data.image_size`` is no option, in a file or on the
    command line."""
    assert "image_size" not in {f.name for f in dataclasses.fields(DataConfig)}
    assert "data.image_size" not in valid_keys()
    cfg = load_config("demo")
    old = config_to_dict(cfg)
    old["data"]["image_size"] = 112
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))
    for attempt in (
        lambda: load_config(str(path)),
        lambda: load_config("demo", ["data.image_size=112"]),
    ):
        with pytest.raises(ConfigError, match=r"unknown config key 'data\.image_size'"):
            attempt()
