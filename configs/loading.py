"""Load a configuration from a preset or a file, apply overrides, save it resolved.

A *spec* names a preset, one module of ``configs/presets/`` exposing
``get_config() -> Config``, by its exact name (``ms1mv2_r50``, ``configs/demo``,
``configs/demo.py``, ``configs/presets/demo.py``: those spellings, relative, nothing
else), or a ``.json``/``.toml`` file whose nested tables override the defaults (a
resolved ``config.json`` written by a run loads back unchanged). Optional
``base = "<preset>"`` at the top of a file starts from a preset.

A path is always a path: an existing file is that file, whatever its name
(``/elsewhere/configs/demo.py`` is not the ``demo`` preset but a Python file, which is
refused: configuration files are ``.json`` or ``.toml``). Only the shipped preset's
own module, reached by any path, stands for the preset.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import inspect
import itertools
import json
import os
import pkgutil
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, get_type_hints

import configs.presets
from common.atomic import write_json
from configs.overrides import apply_overrides, update_from_mapping
from configs.schema import Config, ConfigError


def preset_names() -> list[str]:
    """Names of the preset modules shipped in ``configs/presets/`` (every module there)."""
    return sorted(m.name for m in pkgutil.iter_modules(configs.presets.__path__))


def load_preset(name: str) -> Config:
    """Return a fresh :class:`Config` from the preset module ``configs.presets.<name>``."""
    names = preset_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.0)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown config preset '{name}'{hint} (presets: {', '.join(names)})")
    module = importlib.import_module(f"configs.presets.{name}")
    cfg = module.get_config()
    if not isinstance(cfg, Config):
        raise ConfigError(f"configs.presets.{name}.get_config() must return a Config")
    return cfg


_PRESET_SPELLING = re.compile(
    r"^(?:\./)?(?:configs/(?:presets/)?)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:\.py)?$"
)


def _shipped_module(name: str) -> Path:
    return Path(configs.presets.__path__[0]) / f"{name}.py"


def _preset_name(spec: str) -> str | None:
    """The preset ``spec`` names exactly, or ``None``.

    ``demo`` for ``demo``, ``configs/demo``, ``configs/presets/demo`` (each also with
    ``.py``, optionally after ``./``), as written (relative, no other folders): a
    spelling, not a path.
    An existing file is a preset only if it is the shipped preset module itself
    (``configs/presets/demo.py`` from the repository, or its absolute path); any other
    file, whatever its name, is not (``/elsewhere/configs/demo.py``).
    """
    path = Path(spec)
    if path.is_file():
        shipped = _shipped_module(path.stem)
        try:
            return path.stem if shipped.is_file() and path.samefile(shipped) else None
        except OSError:
            return None
    match = _PRESET_SPELLING.match(spec.replace(os.sep, "/"))
    return match.group("name") if match else None


_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a ``.json`` or ``.toml`` configuration file into a mapping.

    Raises :class:`ConfigError` naming the file, and for a syntax error its line and
    column (``cfg.toml:3:9: invalid TOML: ...``), instead of the parser's traceback.
    """
    kind = "JSON" if path.suffix == ".json" else "TOML"
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a UTF-8 {kind} file (byte {exc.start}: {exc.reason})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        data = json.loads(text) if kind == "JSON" else tomllib.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        lineno = getattr(exc, "lineno", None)
        colno = getattr(exc, "colno", None)
        match = _TOML_POSITION.search(message)
        if match:
            message = message[: match.start()]
            lineno, colno = lineno or int(match.group(1)), colno or int(match.group(2))
        message = getattr(exc, "msg", None) or message
        where = f"{path}:{lineno}:{colno}" if lineno is not None else str(path)
        raise ConfigError(f"{where}: invalid TOML: {message}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid {kind}: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a {kind} object of sections, got {type(data).__name__}"
        )
    return data


def load_config(spec: str, overrides: Iterable[str] = ()) -> Config:
    """Resolve ``spec`` (preset or file), apply ``key=value`` overrides and validate."""
    path = Path(spec)
    if path.suffix in (".json", ".toml"):
        if not path.is_file():
            raise ConfigError(f"config file {spec!r} does not exist")
        data = read_config_file(path)
        base = data.pop("base", None)
        if base is not None and (not isinstance(base, str) or not base):
            raise ConfigError(f"{path}: base must be the name of a preset, got {base!r}")
        cfg = load_preset(base) if base else Config()
        update_from_mapping(cfg, data)
    else:
        name = _preset_name(spec)
        if name is None:
            if path.is_file():
                raise ConfigError(
                    f"config {spec!r} is a file, not a preset (presets are chosen by name: "
                    f"{', '.join(preset_names())}, also written configs/<name>); a "
                    "configuration file must be .json or .toml"
                )
            raise ConfigError(
                f"config {spec!r} is neither a preset ({', '.join(preset_names())}) "
                "nor a .json/.toml file"
            )
        cfg = load_preset(name)
    return apply_overrides(cfg, overrides)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of ``cfg`` (tuples become lists), suitable for JSON."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def save_config(cfg: Config, directory: str | os.PathLike[str]) -> Path:
    """Write the resolved configuration to ``<directory>/config.json`` atomically."""

    target = Path(directory) / "config.json"
    write_json(target, config_to_dict(cfg), sort_keys=False)
    return target


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str]]:
    """``(dotted key, docstring)`` for every field, read from the schema's source."""

    src = inspect.getsource(cls)
    tree = ast.parse(src)
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    out: list[tuple[str, str]] = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(describe(tp, f"{prefix}{f.name}."))
        else:
            out.append((f"{prefix}{f.name}", docs.get(f.name, "")))
    return out
