"""The checks declared on the configuration's field types (``configs.checks``): one
validator applies them to every value, from a preset, a ``.json``/``.toml`` file or an
override, and names the option, what it must be and why."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import pytest

from configs import Config, ConfigError, load_config, load_preset
from configs.checks import OneOf, Range, field_problem


def _sections() -> list[tuple[str, type]]:
    hints = get_type_hints(Config)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(Config) if f.name != "name"]


def _declared(kind: type) -> list[tuple[str, str, Any]]:
    """``(section, field, annotation)`` of every field declaring ``kind`` (a Literal's
    origin, Range or OneOf)."""
    out = []
    for section, cls in _sections():
        for name, hint in get_type_hints(cls, include_extras=True).items():
            extras = get_args(hint)[1:] if get_origin(hint) is Annotated else ()
            if kind is Literal:
                if get_origin(hint) is Literal:
                    out.append((section, name, hint))
            elif any(isinstance(e, kind) for e in extras):
                out.append((section, name, hint))
    return out


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("optimizer", "lr", -1, r"^optimizer\.lr: must be finite and > 0 \(got -1\.0\)"),
        ("optimizer", "lr", "NaN", r"^optimizer\.lr: must be finite and > 0 \(got nan\)"),
        ("scheduler", "power", "Infinity", r"^scheduler\.power: must be finite and > 0 \(the"),
        ("optimizer", "momentum", 1.0, r"^optimizer\.momentum: must be in \[0, 1\): the velo"),
        ("augment", "crop_prob", 1.5, r"^augment\.crop_prob: must be in \[0, 1\] \(got 1\.5\)"),
        ("train", "max_steps", 0, r"^train\.max_steps: must be in \[1, 2\*\*40\], or null"),
        ("data", "num_workers", -2, r"^data\.num_workers: must be >= 0 \(got -2\)"),
        ("optimizer", "name", "lion", r"^optimizer\.name: must be one of sgd, adamw \(got 'lio"),
        ("head", "loss", "tripletface", r"^head\.loss: must be one of arcface, cosface, "),
        ("aux", "triplet_mining", "hardest", r"^aux\.triplet_mining: must be one of batch_all"),
    ],
)
def test_a_json_file_with_a_bad_value_is_refused_naming_the_option(
    tmp_path: Path, section: str, key: str, value: Any, message: str
) -> None:
    path = tmp_path / "config.json"
    text = json.dumps({"base": "demo", section: {key: value}})
    path.write_text(text.replace('"NaN"', "NaN").replace('"Infinity"', "Infinity"))
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))


def test_a_toml_file_is_checked_the_same_way(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('base = "demo"\n[train]\ncollective_timeout_s = inf\n')
    with pytest.raises(ConfigError, match=r"^train\.collective_timeout_s: must be finite, > 0 "):
        load_config(str(path))


@pytest.mark.parametrize(("section", "key", "hint"), _declared(Literal))
def test_every_choice_is_checked_for_a_value_a_preset_sets(section, key, hint) -> None:
    """Python presets set values without the override parser: the Literal is still
    enforced, for every field that declares one."""
    cfg = load_preset("demo")
    setattr(getattr(cfg, section), key, "bogus")
    choices = ", ".join(map(str, get_args(hint)))
    with pytest.raises(ConfigError, match=rf"^{section}\.{key}: must be one of {choices} "):
        cfg.validate()


@pytest.mark.parametrize(("section", "key", "hint"), _declared(Range))
def test_every_range_refuses_nan_and_a_non_number(section, key, hint) -> None:
    for bad in (math.nan, "12", True):
        cfg = load_preset("demo")
        setattr(getattr(cfg, section), key, bad)
        with pytest.raises(ConfigError, match=rf"^{section}\.{key}: must be "):
            cfg.validate()


def test_the_head_loss_choices_are_the_margin_registry_names() -> None:
    from partial_fc import margin_names

    (declared,) = [h for s, k, h in _declared(OneOf) if (s, k) == ("head", "loss")]
    assert tuple(get_args(declared)[1].names()) == margin_names()


@pytest.mark.parametrize(
    ("check", "value", "rule"),
    [
        (Range(gt=0, finite=True), 0, "must be finite and > 0"),
        (Range(ge=0, lt=1), 1, "must be in [0, 1)"),
        (Range(gt=0, le=604800.0, finite=True, unit="s"), math.inf, "finite, > 0 and <= 604800 s"),
        (Range(ge=0, le=1, what="a fraction", why="why"), 2, "must be a fraction in [0, 1]: why"),
        (Range(ge=1, why="(units)"), 0, "must be >= 1 (units)"),
        (Range(ge=0, lt=2**32, text="in [0, 2**32)"), -1, "must be in [0, 2**32)"),
    ],
)
def test_range_messages(check: Range, value: float, rule: str) -> None:
    problem = field_problem(value, Annotated[float, check])
    assert problem is not None and rule in problem and problem.endswith(f"(got {value!r})")
    assert field_problem(None, Annotated[float | None, check]) is None
    assert ", or null" in (field_problem(value, Annotated[float | None, check]) or "")


def test_a_value_in_range_passes() -> None:
    assert field_problem(0.5, Annotated[float, Range(gt=0, le=1)]) is None
    assert field_problem("b", Literal["a", "b"]) is None
    assert re.search("one of a, b", field_problem("c", Literal["a", "b"]) or "")
