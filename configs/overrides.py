"""Typed access to configuration fields: dotted keys, value coercion, suggestions.

``apply_overrides(cfg, ["optimizer.lr=0.05", "head.sample_rate=0.2"])`` sets fields
by dotted key; values are converted to the field's declared type. An unknown key
raises :class:`ConfigError` naming the closest valid key (``difflib``); a value that
cannot be converted names the key and the expected type.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, get_args, get_origin, get_type_hints

from configs.schema import Config, ConfigError

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NULL = {"null", "none", "~"}


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """All dotted leaf keys of the dataclass ``cls`` (dict fields as ``key``)."""
    keys: list[str] = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(valid_keys(tp, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def closest_key(key: str) -> str:
    """The valid dotted key closest to ``key`` (difflib ratio on the whole key or its leaf)."""
    section, _, leaf = key.rpartition(".")

    def score(candidate: str) -> float:
        c_section, _, c_leaf = candidate.rpartition(".")
        whole = difflib.SequenceMatcher(None, key, candidate).ratio()
        by_leaf = difflib.SequenceMatcher(None, leaf, c_leaf).ratio()
        by_leaf *= 1.0 if c_section == section else 0.9
        return max(whole, by_leaf)

    return max(valid_keys(), key=score)


def _unknown_key(key: str) -> ConfigError:
    return ConfigError(f"unknown config key '{key}'; did you mean '{closest_key(key)}'?")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (a string from the command line, or a parsed JSON/TOML value)
    to the declared type ``tp``; raise :class:`ConfigError` naming ``key`` otherwise."""
    origin = get_origin(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if type(None) in args and (
            value is None or (isinstance(value, str) and value.lower() in _NULL)
        ):
            return None
        if isinstance(value, str) and value.lstrip().startswith("["):
            # "[a, b]" for a field that may be a list (data.root): the list, not the text
            args = tuple(sorted(args, key=lambda a: get_origin(a) not in (list, tuple)))
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(key, value, arg)
            except ConfigError:
                continue  # try the next member; none fits: the union's message below
        raise bad
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, choices))} (got {value!r})")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
            try:  # "1e4" style integers
                as_float = float(value)
            except ValueError as exc:
                raise bad from exc
            if as_float.is_integer():
                return int(as_float)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError as exc:
                raise bad from exc
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin in (list, tuple, dict):
        if isinstance(value, str):
            value = _literal(key, value, tp)
        if origin is dict:
            if not isinstance(value, Mapping):
                raise bad
            return dict(value)
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise bad
        args = get_args(tp)
        if origin is list:
            return [coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(
            coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def _literal(key: str, text: str, tp: Any) -> Any:
    """Parse ``[a, b]`` / ``(0.9, 0.99)`` / ``{"k": 1}``; a bare ``a,b`` is a list of strings."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if get_origin(tp) in (list, tuple):
            body = text.strip()
            if len(body) >= 2 and body[0] + body[-1] in ("[]", "()"):
                body = body[1:-1]  # [/data/a,/data/b]: unquoted items in brackets
            return [part.strip() for part in body.split(",") if part.strip()]
        raise ConfigError(f"{key}: cannot parse {text!r} as {_type_name(tp)}") from None


def _scalar_from_text(text: str) -> Any:
    """Best-effort typing of a value for a free-form dict entry (``model.kwargs.x=...``)."""
    if text.lower() in _NULL:
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set the field named by the dotted ``key`` to ``value`` converted to its type."""
    parts = key.split(".")
    node: Any = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            raise _unknown_key(key)
        hints = get_type_hints(type(node))
        if part not in hints or part not in {f.name for f in dataclasses.fields(node)}:
            raise _unknown_key(key)
        tp = hints[part]
        last = i == len(parts) - 1
        if last:
            if dataclasses.is_dataclass(tp):
                if not isinstance(value, Mapping):
                    raise ConfigError(f"{key}: is a section; set its fields as '{key}.<field>'")
                for sub_key, sub_value in value.items():
                    set_key(cfg, f"{key}.{sub_key}", sub_value)
                return
            setattr(node, part, coerce(key, value, tp))
            return
        if get_origin(tp) is dict:
            # model.kwargs.dropout=0.1: free-form entry of a dict field.
            entry = ".".join(parts[i + 1 :])
            current = dict(getattr(node, part))
            current[entry] = _scalar_from_text(value) if isinstance(value, str) else value
            setattr(node, part, current)
            return
        node = getattr(node, part)


def parse_override(item: str) -> tuple[str, str]:
    """Split ``key=value``; raise :class:`ConfigError` if there is no ``=``."""
    if "=" not in item:
        raise ConfigError(
            f"override {item!r} is not of the form key=value (e.g. optimizer.lr=0.05)"
        )
    key, value = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    return key, value.strip()


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """Apply ``key=value`` strings in order, then validate the whole configuration."""
    for item in overrides:
        key, value = parse_override(item)
        set_key(cfg, key, value)
    return cfg.validate()


def update_from_mapping(cfg: Config, data: Mapping[str, Any], prefix: str = "") -> Config:
    """Set fields from a nested mapping (a parsed JSON/TOML file); unknown keys raise."""
    for name, value in data.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping) and _is_section(key):
            update_from_mapping(cfg, value, f"{key}.")
        else:
            set_key(cfg, key, value)
    return cfg


def _is_section(key: str) -> bool:
    node: Any = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return False
        hints = get_type_hints(node)
        if part not in hints:
            return False
        node = hints[part]
    return dataclasses.is_dataclass(node)
