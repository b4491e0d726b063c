"""Backbone weight files: the one place that reads, checks and writes them.

Every backbone uses arcface_torch's parameter and buffer names and shapes
(``conv1``/``bn1``/``prelu``/``layer1.0.conv1``/.../``fc``/``features`` for
IResNet, ``layers.N``/``conv_sep``/``features`` for MobileFaceNet,
``patch_embed.proj``/``blocks.N``/``feature`` for ViT), so a ``backbone.pth``
saved by arcface_torch loads with ``strict=True`` and our weights load into
arcface_torch's model code.

Reading (:func:`read_backbone_weights`, :func:`load_backbone_weights`):

* ``.safetensors`` files through :mod:`safetensors`; anything else
  (``.pt``, ``.pth``, ...) through ``torch.load(weights_only=True)`` (nothing in
  the file is executed);
* a plain ``state_dict``, or one nested under ``state_dict_backbone`` (an
  arcface_torch training checkpoint, ``checkpoint_gpu_0.pt``), ``backbone`` (our
  trainer's ``trainer.pt``) or ``state_dict``;
* wrapper prefixes are stripped: ``module.`` (DistributedDataParallel) and
  ``_orig_mod.`` (``torch.compile``), in any nesting;
* before anything is copied the names and shapes are compared with the model's
  (:func:`check_state_dict`): a mismatch raises :class:`BackboneWeightsError`
  naming the file, the first mismatching key and both shapes (or the missing
  and unexpected keys), and the model is left untouched.

Writing (:func:`save_backbone_weights`): ``.safetensors`` or ``torch.save`` by
the file's suffix, atomically (:mod:`common.atomic`): a failed write leaves the
previous file in place.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from common.atomic import atomic_open, naming
from common.errors import UserError

#: Prefixes added by wrappers around a model: DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

#: Keys under which a training checkpoint nests the backbone's ``state_dict``:
#: arcface_torch's ``checkpoint_gpu_<rank>.pt``, our trainer's ``trainer.pt``, and the
#: common ``{"state_dict": ...}`` convention (tried in this order).
NESTED_KEYS = ("state_dict_backbone", "backbone", "state_dict")

SAFETENSORS_SUFFIX = ".safetensors"


class BackboneWeightsError(UserError, ValueError):
    """Weights that cannot be read, or do not fit the model; the message names the
    file (or source) and the first offending key."""


# ---------------------------------------------------------------------- names
def strip_wrapper_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` without the ``module.``/``_orig_mod.`` prefixes that wrappers add.

    A prefix is removed only when *every* key has it (a model may well own a
    sub-module called ``module``); repeated for nested wrappers
    (``module._orig_mod.conv1.weight`` -> ``conv1.weight``)."""
    out = dict(state)
    while out:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in out)), None)
        if prefix is None:
            break
        out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


# --------------------------------------------------------------------- layouts
#: Per family, the key of the final embedding layer, whose first dimension is the
#: embedding size.
_EMBEDDING_KEYS = (
    "features.weight",  # IResNet
    "features.layers.3.weight",  # MobileFaceNet
    "feature.3.weight",  # ViT
)


def infer_model_kwargs(state: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor keywords read off ``state`` that a model needs to take it, whatever
    the registry's defaults: ``embedding_size``, the rows of the final embedding layer.
    Evaluation and export build their model with these (explicit keywords win)."""
    keys = strip_wrapper_prefixes(state)
    for key in _EMBEDDING_KEYS:
        value = keys.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return {"embedding_size": int(value.shape[0])}
    return {}


# ---------------------------------------------------------------------- checks
def _shape(t: Any) -> tuple[int, ...] | str:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _hint(key: str, file_shape: Any, model_shape: Any) -> str:
    """A sentence for known layout differences (empty when there is none)."""
    if re.fullmatch(r"layers\.1\.layers\.0\.weight", key) and isinstance(file_shape, tuple):
        if len(file_shape) == 4 and file_shape[1] > 1 and model_shape[1] == 1:
            return (
                " (the file's MobileFaceNet has insightface's grouped stage-0 conv: build it "
                "with depthwise_stage0=False, the default of mbf)"
            )
    return ""


def check_state_dict(model: nn.Module, state: Mapping[str, Any], source: str) -> None:
    """Raise :class:`BackboneWeightsError` unless ``state`` (already in the model's
    layout) has exactly ``model``'s keys with the same shapes.

    The message names ``source``, then either the first key (in the model's order)
    whose shape differs, with both shapes, or the first missing and the first
    unexpected keys with their counts. A missing ``num_batches_tracked`` is
    tolerated, as ``torch`` does (it is a counter, not a weight)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    for key, shape in expected.items():
        if key in state and _shape(state[key]) != tuple(shape):
            n = sum(1 for k, s in expected.items() if k in state and _shape(state[k]) != tuple(s))
            file_shape = _shape(state[key])
            raise BackboneWeightsError(
                f"{source}: weights of another architecture or embedding size: {key} has "
                f"shape {file_shape} in the file but {tuple(shape)} in the model "
                f"({n} tensor{'s' if n > 1 else ''} differ in shape)"
                f"{_hint(key, file_shape, tuple(shape))}; nothing was loaded"
            )
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the model's keys are missing (first: {missing[0]})")
        hint = ""
        if unexpected:
            parts.append(
                f"{len(unexpected)} keys of the file are not in the model (first: {unexpected[0]})"
            )
            hint = _hint(unexpected[0], _shape(state[unexpected[0]]), ())
        raise BackboneWeightsError(
            f"{source}: weights of another architecture: {'; '.join(parts)}{hint}; the "
            f"model ({type(model).__name__}) was left unchanged"
        )


# -------------------------------------------------------------------- reading
def _unnest(obj: Any, source: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise BackboneWeightsError(
            f"{source}: expected a state_dict (a mapping of names to tensors), found a "
            f"{type(obj).__name__}"
        )
    if obj and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in NESTED_KEYS:
            if isinstance(obj.get(key), Mapping):
                return _unnest(obj[key], f"{source}[{key!r}]")
        bad = next(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
        raise BackboneWeightsError(
            f"{source}: not a backbone state_dict: entry {bad!r} is a "
            f"{type(obj[bad]).__name__}, not a tensor (nor is any of "
            f"{', '.join(NESTED_KEYS)} a nested state_dict)"
        )
    if not obj:
        raise BackboneWeightsError(f"{source}: the state_dict is empty")
    return dict(obj)


def _weights_only_detail(text: str) -> str:
    """What torch's weights-only unpickler failed on, from its message, without the
    advice around it (rerunning with ``weights_only=False``, filing an issue, ...)."""
    marker = "WeightsUnpickler error:"
    rest = text.split(marker, 1)[1] if marker in text else text.partition("\n")[2]
    skip = ("Check the documentation", "Please file an issue", "Weights only", "(1)", "(2)")
    for line in rest.splitlines():
        line = line.strip()
        if line and not line.startswith(skip):
            return re.split(r"\. (?:Please|To|Check|If|Alternatively)\b", line)[0].rstrip(".")
    return "an object the weights-only reader does not allow"


def read_backbone_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A backbone ``state_dict`` from ``path`` (``.safetensors``, else a
    ``torch.save`` file read with ``weights_only=True``), on the CPU, with the wrapper
    prefixes stripped.

    Raises:
        FileNotFoundError: no file at ``path``.
        BackboneWeightsError: an unreadable or non-state_dict file (named).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such weights file")
    try:
        if path.endswith(SAFETENSORS_SUFFIX):
            from safetensors.torch import load_file

            obj: Any = load_file(path, device="cpu")
        else:
            with warnings.catch_warnings():  # torch's note on the pickle protocol: noise
                warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader error: name the file, keep the reason
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        if isinstance(exc, pickle.UnpicklingError) and "weights_only" in text:
            # torch's weights-only unpickler failed: say on what, never its advice to
            # rerun with weights_only=False (that would run whatever the file holds)
            first = _weights_only_detail(text)
            if re.search(r"global|blocked", first, re.IGNORECASE):
                raise BackboneWeightsError(
                    f"{path}: refused: the file holds objects other than tensors and plain "
                    f"containers, which a weights file must not ({first})"
                ) from None
        raise BackboneWeightsError(
            f"{path}: not a readable weights file (truncated, corrupt, or holding objects "
            f"other than tensors): {first}"
        ) from None
    return strip_wrapper_prefixes(_unnest(obj, path))


def load_backbone_state(
    model: nn.Module, state: Mapping[str, Any], source: str = "state_dict"
) -> None:
    """Load ``state`` into ``model`` with ``strict=True`` after stripping wrapper
    prefixes and checking every key and shape (:func:`check_state_dict`, which names
    ``source``). On a mismatch nothing is copied."""
    stripped = strip_wrapper_prefixes(state)
    check_state_dict(model, stripped, source)
    model.load_state_dict(stripped, strict=True)


def load_backbone_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Read ``path`` (:func:`read_backbone_weights`) into ``model`` (see
    :func:`load_backbone_state`).

    Raises:
        BackboneWeightsError: the file cannot be read, or its keys or shapes differ
            from the model's (weights of another architecture or embedding size);
            the model is then unchanged.
    """
    load_backbone_state(model, read_backbone_weights(path), os.fspath(path))


# -------------------------------------------------------------------- writing
def save_backbone_weights(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str]
) -> None:
    """Write ``state_dict`` to ``path`` atomically: ``.safetensors`` when the name ends
    so, ``torch.save`` otherwise (``.pt``/``.pth``). Tensors are saved as contiguous
    CPU copies; wrapper prefixes are stripped so the file loads into a bare model
    (ours or arcface_torch's). A failed write leaves any previous file in place and
    raises an ``OSError`` naming ``path``."""
    path = os.fspath(path)
    tensors = {
        k: v.detach().to("cpu", copy=True).contiguous()
        for k, v in strip_wrapper_prefixes(state_dict).items()
    }
    if path.endswith(SAFETENSORS_SUFFIX):
        from safetensors.torch import save

        data = save(tensors, metadata={"format": "pt", "layout": "arcface_torch"})
        with naming(path), atomic_open(path, "wb") as fh:
            fh.write(data)
    else:
        with naming(path), atomic_open(path, "wb") as fh:
            torch.save(tensors, fh)
