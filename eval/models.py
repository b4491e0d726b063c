"""Building the model to evaluate: a backbone checkpoint, a model folder or an ONNX file.

Checkpoints are backbone ``state_dict`` files (``torch.save`` files read with
``weights_only=True``, or ``.safetensors``), ours or arcface_torch's, read and checked
by :mod:`backbones.weights`. A model folder (``python -m eval.export``) loads through
:func:`backbones.pretrained.from_pretrained`, which reads the network from its ``config.json``.
Backbones come from ``backbones.registry.get_model(name, **kwargs)``.

Every embedder made here checks its outputs (:func:`eval.extract.check_embeddings`):
a NaN or infinite embedding is a :class:`~eval.errors.NonFiniteEmbeddingError` naming
the model, never a number.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from backbones import pretrained, registry
from backbones.weights import infer_model_kwargs, load_backbone_state, read_backbone_weights
from common.dist import distributed_command, resolve_device
from eval.errors import EvalUsageError
from eval.extract import CheckedEmbedder, Embedder, module_embedder
from eval.onnx_infer import OnnxEmbedder


def check_device(device: str | None, local_rank: int = 0) -> None:
    """Refuse a malformed ``--device`` (or a CUDA device that does not exist) as an
    :class:`~eval.errors.EvalUsageError` naming the option, before any work."""
    try:
        resolve_device(device, local_rank)
    except ValueError as exc:  # documented: a message naming --device
        raise EvalUsageError(str(exc)) from None


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a backbone ``state_dict`` (``.pt``/``.pth`` with ``weights_only=True``, or
    ``.safetensors``): :func:`backbones.weights.read_backbone_weights`, which strips the
    ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes."""
    return read_backbone_weights(path)


def build_backbone(
    network: str,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> nn.Module:
    """``backbones.registry.get_model(network, **kwargs)`` with optional checkpoint weights,
    in eval mode.

    The weights may be ours or arcface_torch's (the same names); the embedding size the
    file implies (:func:`backbones.weights.infer_model_kwargs`) is added unless given. Weights of
    another network raise :class:`backbones.weights.BackboneWeightsError` (a
    ``ValueError``) naming the file, the network and the first mismatching key."""
    state = None
    if checkpoint is not None:
        state = load_state_dict(checkpoint)
        kwargs = {**infer_model_kwargs(state), **kwargs}
    try:
        model = registry.get_model(network, **kwargs)
    except ValueError as exc:  # an unknown name: an option error, not a bug
        if network in registry.list_models():
            raise
        raise EvalUsageError(f"--network {network!r}: {exc}") from None
    if state is not None:
        load_backbone_state(model, state, f"{os.fspath(checkpoint)} (network {network!r})")
    return model.to(device).eval()


def make_embedder(
    *,
    network: str | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    onnx_path: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    onnx_input: Mapping[str, Any] | None = None,
) -> Embedder:
    """An :data:`~eval.extract.Embedder` from a checkpoint (+ network name), a model folder
    (``checkpoint`` a directory written by ``eval.export``; the network is its config's) or
    an ONNX file (``onnx_input``: :class:`~eval.onnx_infer.OnnxEmbedder`'s ``input_*``
    overrides)."""
    if onnx_path is not None:
        return OnnxEmbedder(onnx_path, device=device, **(onnx_input or {}))
    if checkpoint is not None and os.path.isdir(checkpoint):
        folder = pretrained.from_pretrained(checkpoint).to(device).eval()
        return CheckedEmbedder(module_embedder(folder), os.fspath(checkpoint))
    if network is None:
        raise EvalUsageError("--network is required with --checkpoint")
    name = os.fspath(checkpoint) if checkpoint is not None else f"{network} (random weights)"
    backbone = build_backbone(network, checkpoint, device=device)
    return CheckedEmbedder(module_embedder(backbone), name)


@contextlib.contextmanager
def command_embedder(
    network: str | None,
    checkpoint: str | None,
    onnx_path: str | None,
    device: str | None,
    onnx_input: Mapping[str, Any] | None = None,
) -> Iterator[tuple[Any, Embedder]]:
    """``(DistContext, embedder)`` of an evaluation command, inside its process group
    (torchrun or a single process), which is destroyed on exit.

    A backbone checkpoint runs and gathers on the rank's device (``cuda:LOCAL_RANK``
    and nccl under CUDA). onnxruntime returns CPU arrays, so an ONNX model's ranks
    gather over gloo on the CPU while its session runs on the rank's device.
    """
    check_device(device)
    with distributed_command("cpu" if onnx_path else device) as ctx:
        run_on = str(resolve_device(device, ctx.local_rank) if onnx_path else ctx.device)
        if ctx.is_main:
            print(ctx.describe(), file=sys.stderr, flush=True)
        embedder = make_embedder(
            network=network,
            checkpoint=checkpoint,
            onnx_path=onnx_path,
            device=run_on,
            onnx_input=onnx_input,
        )
        if ctx.is_main and hasattr(embedder, "describe"):
            print(embedder.describe(), file=sys.stderr, flush=True)
        yield ctx, embedder
