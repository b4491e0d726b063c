"""Embedding faces of raw photos: the model (checkpoint or ONNX) and flip-test embeddings
of aligned crops. Shared by ``eval.compare`` and ``eval.embed``.

A photo's embedding is the one pair verification uses: ``emb(face) + emb(mirrored face)``,
L2-normalised, of the 112x112 crop that :class:`datasets.detect.finder.FaceFinder` aligns
(5-point similarity transform onto the ArcFace template). The cosine similarity of two
such embeddings is their dot product; the verification protocol's squared distance is
``2 - 2 * cosine``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np
import torch

from eval.extract import Embedder, extract_embeddings
from eval.metrics import l2_normalize


def open_model(
    model: str | os.PathLike[str],
    network: str | None = None,
    device: str | None = None,
    onnx_input: Mapping[str, Any] | None = None,
) -> tuple[Embedder, int]:
    """``(embedder, input side)`` of ``model``: an ONNX file (``*.onnx``: ours or anyone's;
    its input convention is read as :class:`eval.onnx_infer.OnnxEmbedder` documents, with
    ``onnx_input`` overrides) or a backbone checkpoint, which needs ``network`` (input 112).

    Raises:
        ValueError: a checkpoint without ``network``, a file that does not load.
        FileNotFoundError: no such file.
    """
    from eval.models import make_embedder
    from trainer.distributed import resolve_device

    path = os.fspath(model)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--model {path}: no such file")
    dev = str(resolve_device(device, 0))
    if path.lower().endswith(".onnx"):
        emb = make_embedder(onnx_path=path, device=dev, onnx_input=onnx_input)
        h, w = emb.input_hw  # type: ignore[attr-defined]  # an OnnxEmbedder
        if h != w:
            raise ValueError(f"--model {path}: square input expected, the model takes {h}x{w}")
        return emb, h
    if any(v is not None for v in (onnx_input or {}).values()):
        raise ValueError(f"--model {path}: --input-* options apply to ONNX models only")
    if network is None:
        raise ValueError(f"--model {path}: a checkpoint needs --network (r50, mbf, ...)")
    return make_embedder(network=network, checkpoint=path, device=dev), 112


def embed_aligned(embed: Embedder, crops_bgr: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Flip-test embeddings of aligned crops.

    Args:
        embed: an :data:`~eval.extract.Embedder`.
        crops_bgr: uint8 ``(N, S, S, 3)`` BGR crops (as ``FaceFinder`` makes them).
    Returns:
        float32 ``(N, D)`` unit rows: ``emb(x) + emb(mirror(x))``, L2-normalised.
    """
    crops = np.asarray(crops_bgr)
    if crops.ndim != 4 or crops.shape[-1] != 3 or crops.dtype != np.uint8:
        raise ValueError(f"crops must be uint8 (N, S, S, 3), got {crops.dtype}{crops.shape}")
    rgb = np.ascontiguousarray(crops[..., ::-1].transpose(0, 3, 1, 2))
    # group=None outside torch.distributed: computed locally
    emb, emb_flip = extract_embeddings(embed, torch.from_numpy(rgb), batch_size, flip=True)
    assert emb_flip is not None
    return l2_normalize(emb + emb_flip).astype(np.float32)


def resize_crop(bgr: np.ndarray, size: int) -> np.ndarray:
    """An already aligned face, brought to ``size x size`` (area interpolation)."""
    if bgr.shape[:2] == (size, size):
        return bgr
    return cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA)
