"""Building the model to evaluate: a backbone checkpoint or an ONNX file.

Checkpoints are plain backbone ``state_dict`` files written by ``torch.save``
and are read with ``torch.load(path, weights_only=True)``. Backbones come from
``backbones.get_model(name, **kwargs)``, imported lazily.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
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
    onnx_input: Mapping[str, Any] | None = None,
) -> Embedder:
    """An :data:`~eval.extract.Embedder` from a checkpoint (+ network name) or an ONNX file
    (``onnx_input``: :class:`~eval.onnx_infer.OnnxEmbedder`'s ``input_*`` overrides)."""
    if onnx_path is not None:
        from eval.onnx_infer import OnnxEmbedder

        return OnnxEmbedder(onnx_path, device=device, **(onnx_input or {}))
    if network is None:
        raise ValueError("--network is required with --checkpoint")
    return module_embedder(build_backbone(network, checkpoint, device=device))


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
    from trainer.distributed import distributed_command, resolve_device

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
