"""Model folders: a backbone's weights with the facts needed to use it, loadable anywhere.

A model folder (written by ``python -m eval.export``, see ``docs/eval.md``) holds:

* ``model.safetensors``: the backbone's ``state_dict`` with arcface_torch's names;
* ``config.json``: what builds the model and feeds it (:func:`model_config`): the
  network, its embedding size and constructor keywords, and the input spec (side, pixel
  mean and std, colour order, layout), plus facts for people (training data, head and
  margin, the project's version);
* ``model.onnx`` and ``README.md`` (the model card), which this module does not read.

:func:`from_pretrained` builds the network that ``config.json`` names and loads
``model.safetensors`` into it strictly: a file of another architecture or embedding
size is a :class:`~backbones.weights.BackboneWeightsError` naming both files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from backbones.registry import get_model, input_spec, list_models
from backbones.weights import BackboneWeightsError, load_backbone_state, read_backbone_weights
from common.face_input import InputSpec

MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"
MODEL_ONNX = "model.onnx"
MODEL_CARD = "README.md"

#: ``config.json``'s ``format`` and ``format_version``.
FOLDER_FORMAT = "partial-fc-model"
FOLDER_FORMAT_VERSION = 1

#: Constructor keywords that concern training only, dropped from a folder's config.
TRAINING_ONLY_KWARGS = ("checkpoint",)


class ModelFolderError(BackboneWeightsError):
    """A model folder whose ``config.json`` is missing, unreadable or inconsistent; the
    message names the file and the key."""


def model_config(
    network: str,
    embedding_size: int,
    model_kwargs: dict[str, Any] | None = None,
    **facts: Any,
) -> dict[str, Any]:
    """``config.json`` of a folder holding ``network``: the input spec from the registry
    (:func:`backbones.registry.input_spec`), the keywords that rebuild the model, and any
    further JSON-able ``facts`` (``training_data``, ``head``, ``project_version``...)."""
    spec = input_spec(network)
    kwargs = {k: v for k, v in (model_kwargs or {}).items() if k not in TRAINING_ONLY_KWARGS}
    return {
        "format": FOLDER_FORMAT,
        "format_version": FOLDER_FORMAT_VERSION,
        "network": network,
        "embedding_size": int(embedding_size),
        "model_kwargs": kwargs,
        "input": {
            "size": spec.size,
            "mean": spec.mean,
            "std": spec.std,
            "color": spec.color,
            "layout": "NCHW",
            "formula": f"(pixel - {spec.mean:g}) / {spec.std:g}, pixel in [0, 255]",
        },
        "output": "embedding, not L2-normalised",
        "weights": MODEL_WEIGHTS,
        **facts,
    }


def is_model_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory holding a model folder's weights and config."""
    p = Path(path)
    return p.is_dir() and (p / MODEL_WEIGHTS).is_file() and (p / MODEL_CONFIG).is_file()


def read_model_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked ``config.json`` of the model folder ``directory``.

    Raises:
        FileNotFoundError: no ``config.json`` (or no directory).
        ModelFolderError: not JSON, another format, or a missing or bad key (named).
    """
    path = Path(directory) / MODEL_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (not a model folder: eval.export makes one)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"{path}: not a JSON file ({exc})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FOLDER_FORMAT:
        raise ModelFolderError(
            f'{path}: not a model folder\'s config ("format" must be {FOLDER_FORMAT!r})'
        )
    if cfg.get("format_version") != FOLDER_FORMAT_VERSION:
        raise ModelFolderError(
            f"{path}: format_version {cfg.get('format_version')!r}; this version reads "
            f"{FOLDER_FORMAT_VERSION}"
        )
    network = cfg.get("network")
    if network not in list_models():
        raise ModelFolderError(
            f"{path}: network {network!r} is not a backbone of this project "
            f"({', '.join(list_models())})"
        )
    size = cfg.get("embedding_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ModelFolderError(f"{path}: embedding_size must be a positive integer, got {size!r}")
    if not isinstance(cfg.get("model_kwargs", {}), dict):
        raise ModelFolderError(f"{path}: model_kwargs must be an object")
    spec = folder_input_spec(cfg, path)
    if spec != input_spec(network):
        raise ModelFolderError(
            f"{path}: input {spec} differs from what network {network!r} reads "
            f"({input_spec(network)})"
        )
    return cfg


def folder_input_spec(cfg: dict[str, Any], source: str | os.PathLike[str]) -> InputSpec:
    """The :class:`~common.face_input.InputSpec` that a folder's config records."""
    raw = cfg.get("input")
    try:
        assert isinstance(raw, dict)
        spec = InputSpec(
            size=int(raw["size"]), mean=float(raw["mean"]), std=float(raw["std"]),
            color=raw["color"],
        )  # fmt: skip
        assert spec.color in ("RGB", "BGR") and spec.size > 0 and spec.std != 0
    except (AssertionError, KeyError, TypeError, ValueError):
        raise ModelFolderError(
            f'{source}: "input" must hold size, mean, std (non-zero) and color (RGB or BGR); '
            f"got {raw!r}"
        ) from None
    return spec


def from_pretrained(directory: str | os.PathLike[str]) -> nn.Module:
    """The backbone of the model folder ``directory``, on the CPU in eval mode.

    Raises:
        FileNotFoundError: no such folder, ``config.json`` or ``model.safetensors``.
        ModelFolderError: a bad ``config.json`` (the key is named).
        BackboneWeightsError: weights that do not fit the network the config names
            (another architecture or embedding size; both files are named).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such model folder")
    cfg = read_model_config(directory)
    weights = directory / MODEL_WEIGHTS
    state = read_backbone_weights(weights)
    try:
        model = get_model(
            cfg["network"], embedding_size=cfg["embedding_size"], **cfg.get("model_kwargs", {})
        )
    except TypeError as exc:  # a keyword the model does not take
        raise ModelFolderError(f"{directory / MODEL_CONFIG}: model_kwargs: {exc}") from None
    load_backbone_state(
        model,
        state,
        f"{weights} (against {directory / MODEL_CONFIG}: network {cfg['network']!r}, "
        f"embedding_size {cfg['embedding_size']})",
    )
    return model.eval()
