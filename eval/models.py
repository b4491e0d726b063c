"""Building the model to evaluate: a backbone checkpoint or an ONNX file.

Checkpoints are plain backbone ``state_dict`` files written by ``torch.save``
and are read with ``torch.load(path, weights_only=True)``. Backbones come from
``backbones.get_model(name, **kwargs)``, imported lazily.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from eval.extract import Embedder, module_embedder


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a backbone ``state_dict`` with ``weights_only=True``.

    A leading ``module.`` (DDP) prefix is stripped from every key.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a loadable weights-only checkpoint: {exc}") from exc
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state_dict mapping, got {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def build_backbone(
    network: str,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> nn.Module:
    """``backbones.get_model(network, **kwargs)`` with optional checkpoint weights, in eval mode."""
    from backbones import get_model  # lazy: the backbone zoo is heavy and optional here

    model = get_model(network, **kwargs)
    if checkpoint is not None:
        state = load_state_dict(checkpoint)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(
                f"{os.fspath(checkpoint)}: does not match network {network!r}: {exc}"
            ) from exc
    return model.to(device).eval()


def make_embedder(
    *,
    network: str | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    onnx_path: str | os.PathLike[str] | None = None,
    device: str = "cpu",
) -> Embedder:
    """An :data:`~eval.extract.Embedder` from a checkpoint (+ network name) or an ONNX file."""
    if onnx_path is not None:
        from eval.onnx_infer import OnnxEmbedder

        return OnnxEmbedder(onnx_path, device=device)
    if network is None:
        raise ValueError("--network is required with --checkpoint")
    return module_embedder(build_backbone(network, checkpoint, device=device))
