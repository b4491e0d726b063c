"""Configuration files and values (issue 20, items 6 and 11): parse errors name the file,
line and column; every option is checked against the range where its formula means
something (finite, and the limits the model and the loop need), saying why."""

from __future__ import annotations

import json

import pytest
import torch

from configs import ConfigError, load_config
from trainer.build import check_batch_norm


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("bad.json", '{"train": {"epochs": 3,}}', r"bad\.json:1:24: invalid JSON: Expecting"),
        ("bad.json", '{\n  "optimizer": {"lr": 0.1\n}', r"bad\.json:3:2: invalid JSON"),
        ("bad.toml", "[train]\nepochs = 3\nlr = = 2\n", r"bad\.toml:3:6: invalid TOML: Invalid"),
        ("bad.toml", "[train\nepochs = 3\n", r"bad\.toml:1:7: invalid TOML"),
        ("list.json", "[1, 2]", r"list\.json: expected a JSON object of sections, got list"),
        ("bin.toml", b"\xff\xfe[train]", r"bin\.toml: not a UTF-8 TOML file"),
        ("base.json", '{"base": 3}', r"base\.json: base must be the name of a preset"),
    ],
)
def test_parse_errors_name_file_line_and_column(tmp_path, name, text, where):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(ConfigError, match=where) as info:
        load_config(str(path))
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # non-finite values that passed "> 0" / ">= 0"
        ("train.collective_timeout_s=inf", r"train\.collective_timeout_s: must be finite"),
        ("train.collective_timeout_s=1e9", r"train\.collective_timeout_s: .*<= 604800 seconds"),
        ("scheduler.warmup_epochs=inf", r"scheduler\.warmup_epochs: must be finite"),
        ("scheduler.warmup_epochs=nan", r"scheduler\.warmup_epochs: must be finite"),
        ("scheduler.power=inf", r"scheduler\.power: must be finite"),
        ("optimizer.weight_decay=inf", r"optimizer\.weight_decay: must be finite"),
        ("optimizer.eps=inf", r"optimizer\.eps: must be in \(0, 1\)"),
        ("optimizer.momentum=nan", r"optimizer\.momentum: must be in \[0, 1\)"),
        ("optimizer.lr=nan", r"optimizer\.lr: must be finite and > 0"),
        ("train.clip_grad_norm=inf", r"train\.clip_grad_norm: must be finite and > 0, or null"),
        # ranges where the formula stops meaning anything
        ("train.epochs=1e12", r"train\.epochs: must be in \[1, 100000\] .*ETA"),
        (
            "scheduler.warmup_epochs=5",
            r"scheduler\.warmup_epochs: must be shorter than train\.epochs=2",
        ),
        (
            "optimizer.weight_decay=20",
            r"optimizer\.weight_decay: times optimizer\.lr=0\.1 must be < 1",
        ),
        ("optimizer.betas=(0.9,1.0)", r"optimizer\.betas: .*divide by zero at 1"),
        ("train.seed=-1", r"train\.seed: must be in \[0, 2\*\*32\)"),
        ("train.grad_accum=100000", r"train\.grad_accum: must be in \[1, 65536\]"),
        (
            "data.max_skipped_fraction=1",
            r"data\.max_skipped_fraction: must be a fraction in \[0, 1\)",
        ),
        ("data.max_skipped_fraction=nan", r"data\.max_skipped_fraction: must be a fraction"),
        (
            "aux.center_distance=cosine aux.center_radius=2.5",
            r"aux\.center_radius: must be < 2 .*0 for every sample",
        ),
        (
            "aux.triplet_distance=cosine aux.triplet_margin=3",
            r"aux\.triplet_margin: must be < 2 with aux\.triplet_distance=cosine",
        ),
        ("eval.targets=lfw,data/lfw.bin", r"eval\.targets: must have distinct names"),
        ("eval.targets=['']", r"eval\.targets: must be names or paths"),
    ],
)
def test_values_outside_their_meaningful_range_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", ["train.epochs=2", *override.split(" ")])


def test_json_nan_and_infinity_literals_are_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"base": "demo", "train": {"collective_timeout_s": float("inf")}}))
    with pytest.raises(ConfigError, match=r"train\.collective_timeout_s: must be finite"):
        load_config(str(path))


def test_presets_stay_valid_and_in_range():
    cfg = load_config("demo", ["aux.center_distance=cosine", "aux.center_radius=0.5"])
    assert cfg.aux.center_radius == 0.5


def test_per_rank_batch_of_one_with_batch_norm_is_refused():
    cfg = load_config("demo", ["data.batch_size=1"])
    bn = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    with pytest.raises(ConfigError, match=r"data\.batch_size=1: .*BatchNorm.*at least 2 samples"):
        check_batch_norm(bn, cfg)
    check_batch_norm(torch.nn.Linear(2, 2), cfg)  # no BatchNorm: a batch of 1 is fine
    check_batch_norm(bn, load_config("demo", ["data.batch_size=2"]))
