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
* this project's format-1 names (``stem.*``, ``units.N.*``, ``head.*``, written
  before the backbones took arcface_torch's names) are translated
  (:func:`upgrade_state_dict`; the models run it as a ``load_state_dict``
  pre-hook too, so ``model.load_state_dict(old_state)`` works anywhere);
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

#: Top-level module names of this project's format-1 backbone layout; a state with a
#: key under one of them is translated (none of them exists in the current layout).
LEGACY_ROOTS = ("stem.", "units.", "head.")

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


def is_legacy_state(keys: Any) -> bool:
    """True if ``keys`` (state_dict names, without wrapper prefixes) use this project's
    format-1 layout (``stem.*``, ``units.N.*``, ``head.*``)."""
    return any(k.startswith(LEGACY_ROOTS) for k in keys)


def rename_legacy_keys(keys: Any, renames: Mapping[str, str]) -> dict[str, str]:
    """Map each format-1 key to its current name by the longest matching module
    prefix of ``renames`` (``{"units.3.": "layer2.1.", ...}``, every prefix ending
    in ``.``); keys no prefix matches keep their name. Returns ``{old: new}``."""
    ordered = sorted(renames, key=len, reverse=True)
    out = {}
    for key in keys:
        old = next((p for p in ordered if key.startswith(p)), None)
        out[key] = key if old is None else renames[old] + key[len(old) :]
    return out


def _embed_depthwise(weight: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """A depthwise conv weight ``(C, 1, k, k)`` as the equivalent weight of a grouped
    conv with ``m = C / groups`` input channels per group, ``(C, m, k, k)``, or
    ``None`` if ``shape`` is not such a weight.

    Output channel ``o`` of a grouped conv (in = out = C channels) sees inputs
    ``m * (o // m) + j`` for ``j < m``; a depthwise conv's output ``o`` sees input
    ``o`` only, i.e. ``j = o % m``. Every other entry is zero, so both convs compute
    the same function (format-1 ``mbf`` weights in insightface's grouped stage 0)."""
    c, one, *k = weight.shape
    if one != 1 or len(shape) != 4 or shape[0] != c or list(shape[2:]) != k or shape[1] <= 1:
        return None
    m = shape[1]
    if c % m:
        return None
    out = weight.new_zeros(shape)
    o = torch.arange(c)
    out[o, o % m] = weight[:, 0]
    return out


def upgrade_state_dict(model: nn.Module, state: dict[str, Any], prefix: str = "") -> None:
    """Bring the keys of ``state`` under ``prefix`` to ``model``'s layout, in place.

    The models run this as a ``load_state_dict`` pre-hook (``prefix`` is where the
    model sits inside the module being loaded: ``""`` at the top, ``module.`` inside
    DDP). It

    1. at the top (``prefix == ""``) strips the wrapper prefixes of
       :func:`strip_wrapper_prefixes`;
    2. translates this project's format-1 names (:func:`is_legacy_state`) with the
       model's ``legacy_renames()`` (``{old module prefix: new module prefix}``);
    3. for format-1 weights only, widens a fully depthwise conv weight where the
       model has a grouped conv of the same channels (:func:`_embed_depthwise`):
       format-1 ``mbf`` had a depthwise stage 0, insightface's has groups=64.

    Weights in the current layout pass unchanged (no copy of the tensors)."""
    if prefix == "" and any(k.startswith(WRAPPER_PREFIXES) for k in state):
        stripped = strip_wrapper_prefixes(state)
        if stripped.keys() != state.keys():
            state.clear()
            state.update(stripped)
    mine = [k for k in state if k.startswith(prefix)]
    rel = [k[len(prefix) :] for k in mine]
    renames_of = getattr(model, "legacy_renames", None)
    if renames_of is None or not is_legacy_state(rel):
        return
    mapping = rename_legacy_keys(rel, renames_of())
    values = {mapping[r]: state.pop(k) for k, r in zip(mine, rel, strict=True)}
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    for key, value in values.items():
        want = shapes.get(key)
        if isinstance(value, torch.Tensor) and want is not None and value.shape != want:
            widened = _embed_depthwise(value, want)
            if widened is not None:
                value = widened
        state[prefix + key] = value


def upgrade_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook running :func:`upgrade_state_dict` (registered by
    every backbone class with ``register_load_state_dict_pre_hook``)."""
    del args
    upgrade_state_dict(module, state_dict, prefix)


# --------------------------------------------------------------------- layouts
#: Per layout, the key whose first dimension is the embedding size, tried in order
#: (format-1 ViT before format-1 IResNet: a ViT's ``head.4`` is its last FC, whose
#: rows are the embedding too; format-1 mbf last: a ViT's ``head.2`` is a hidden BN).
_EMBEDDING_KEYS = (
    "features.weight",  # IResNet
    "features.layers.3.weight",  # MobileFaceNet
    "feature.3.weight",  # ViT
    "head.5.weight",  # format-1 ViT
    "head.4.weight",  # format-1 IResNet
    "head.2.weight",  # format-1 MobileFaceNet
)


def infer_model_kwargs(state: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor keywords read off ``state`` that a model needs to take it, whatever
    the registry's defaults:

    * ``embedding_size``: the rows of the final embedding layer;
    * ``layout="v1"`` for a ViT saved in this project's format-1 layout (its
      attention has qkv biases: see :mod:`backbones.vit`).

    Evaluation and export build their model with these (explicit keywords win)."""
    keys = strip_wrapper_prefixes(state)
    out: dict[str, Any] = {}
    for key in _EMBEDDING_KEYS:
        value = keys.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            out["embedding_size"] = int(value.shape[0])
            break
    if is_legacy_state(keys) and any(k.endswith("attn.qkv.bias") for k in keys):
        out["layout"] = "v1"
    return out


def v1_model_kwargs(network: str, kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The keywords that rebuild, under this version, the network that format 1 built
    for ``get_model(network, **kwargs)`` (a resumed format-1 trainer checkpoint's
    ``model.kwargs`` are compared as if they included them):

    * ``mbf`` and any MobileFaceNet with a single stage-0 conv: its conv was fully
      depthwise, now insightface's grouping is the default -> ``depthwise_stage0=True``
      (``mbf_tiny`` is still depthwise: nothing to add);
    * ``vit_*``: format 1 had qkv biases, a GELU MLP and a ReLU in the head ->
      ``layout="v1"``;
    * IResNet: only the names changed -> nothing.
    """
    from backbones.registry import model_family, registry_defaults

    try:
        family = model_family(network)
    except ValueError:  # not one of ours: nothing known about its format 1
        return {}
    merged = {**registry_defaults(network), **dict(kwargs or {})}
    single_conv = list(merged.get("blocks", (1,)))[:1] == [1]
    if family == "mbf" and single_conv and not merged.get("depthwise_stage0", False):
        return {"depthwise_stage0": True}
    if family == "vit" and merged.get("layout", "arcface") != "v1":
        return {"layout": "v1"}
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
    if key.endswith("attn.qkv.bias"):
        return (
            " (the file holds a ViT of this project's format-1 layout, with qkv biases: "
            "build the model with layout='v1')"
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
    prefixes stripped. Format-1 names are kept here; :func:`load_backbone_weights`
    (or the model's ``load_state_dict``) translates them.

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
    prefixes, translating format-1 names (:func:`upgrade_state_dict`) and checking
    every key and shape (:func:`check_state_dict`, which names ``source``). On a
    mismatch nothing is copied."""
    upgraded = strip_wrapper_prefixes(state)
    upgrade_state_dict(model, upgraded)
    check_state_dict(model, upgraded, source)
    model.load_state_dict(upgraded, strict=True)


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
