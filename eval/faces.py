"""Embedding faces of raw photos: the model (checkpoint or ONNX) and flip-test embeddings
of aligned crops. Shared by ``eval.compare`` and ``eval.embed``.

A photo's embedding is the one pair verification uses: ``emb(face) + emb(mirrored face)``,
L2-normalised, of the 112x112 crop that :class:`datasets.faces.finder.FaceFinder` aligns
(5-point similarity transform onto the ArcFace template). The cosine similarity of two
such embeddings is their dot product; the verification protocol's squared distance is
``2 - 2 * cosine``.

A face whose embedding is not finite (NaN or infinity, from the model or from adding a
mirrored embedding that overflows) never gets a similarity: :func:`embed_aligned`
raises :class:`~eval.errors.NonFiniteEmbeddingError` naming the model and the photos,
and :func:`embed_aligned_rows` marks the rows (``eval.embed`` reports them as
``non_finite_embedding``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch

from backbones.pretrained import folder_input_spec, read_model_config
from backbones.registry import input_spec
from common.dist import resolve_device
from datasets.faces.arguments import face_options
from datasets.faces.options import FaceOptions
from eval.errors import EvalUsageError, ModelError, NonFiniteEmbeddingError
from eval.extract import Embedder, embedder_name, normalize_pixels
from eval.metrics import l2_normalize
from eval.models import check_device, make_embedder

#: The aligned crop sides face alignment makes (``FaceOptions.image_size``).
ALIGNED_SIDES = (16, 1024)


def open_model(
    model: str | os.PathLike[str],
    network: str | None = None,
    device: str | None = None,
    onnx_input: Mapping[str, Any] | None = None,
) -> tuple[Embedder, int]:
    """``(embedder, input side)`` of ``model``: an ONNX file (``*.onnx``: ours or anyone's;
    its input convention is read as :class:`eval.onnx_infer.OnnxEmbedder` documents, with
    ``onnx_input`` overrides), a model folder (``eval.export``; network and input side from
    its ``config.json``) or a backbone checkpoint, which needs ``network`` (input 112).

    Raises:
        ModelError: a file that does not load, or an ONNX input that is not square.
        EvalUsageError: a checkpoint without ``network``, ``--input-*`` options with a
            checkpoint, a bad ``device``.
        FileNotFoundError: no such file.
    """
    path = os.fspath(model)
    if os.path.isdir(path):  # a model folder (eval.export): its config names the network
        if any(v is not None for v in (onnx_input or {}).values()):
            raise EvalUsageError(f"--model {path}: --input-* options apply to ONNX models only")
        check_device(device)
        dev = str(resolve_device(device, 0))
        side = folder_input_spec(read_model_config(path), path).size
        return make_embedder(checkpoint=path, device=dev), side
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--model {path}: no such file")
    check_device(device)
    dev = str(resolve_device(device, 0))
    if path.lower().endswith(".onnx"):
        emb = make_embedder(onnx_path=path, device=dev, onnx_input=onnx_input)
        h, w = emb.input_hw  # type: ignore[attr-defined]  # an OnnxEmbedder
        if h != w:
            raise ModelError(f"--model {path}: square input expected, the model takes {h}x{w}")
        return emb, h
    if any(v is not None for v in (onnx_input or {}).values()):
        raise EvalUsageError(f"--model {path}: --input-* options apply to ONNX models only")
    if network is None:
        raise EvalUsageError(f"--model {path}: a checkpoint needs --network (r50, mbf, ...)")
    return make_embedder(network=network, checkpoint=path, device=dev), input_spec(network).size


def finder_options(args: argparse.Namespace, size: int, model: str) -> FaceOptions:
    """:func:`datasets.faces.arguments.face_options` for a model of input side ``size``,
    which face alignment must be able to make (:data:`ALIGNED_SIDES`); bad face options
    are an :class:`~eval.errors.EvalUsageError` naming the option."""
    lo, hi = ALIGNED_SIDES
    if not lo <= size <= hi:
        raise ModelError(
            f"--model {model}: input {size}x{size}; face alignment makes crops of {lo} to "
            f"{hi} pixels (use --aligned with crops of that size)"
        )
    try:
        return face_options(args, image_size=size)
    except ValueError as exc:  # FaceOptions' checks: each message names its option
        raise EvalUsageError(str(exc)) from None


def embed_aligned_rows(
    embed: Embedder, crops_bgr: np.ndarray, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Flip-test embeddings of aligned crops, and which of them are finite.

    Args:
        embed: an :data:`~eval.extract.Embedder` (a checked one may raise
            :class:`~eval.errors.NonFiniteEmbeddingError`: its finite rows are kept).
        crops_bgr: uint8 ``(N, S, S, 3)`` BGR crops (as ``FaceFinder`` makes them).
    Returns:
        ``(embeddings, finite)``: float32 ``(N, D)`` unit rows, ``emb(x) + emb(mirror(x))``
        L2-normalised (NaN rows where not finite), and bool ``(N,)``.
    """
    crops = np.asarray(crops_bgr)
    if crops.ndim != 4 or crops.shape[-1] != 3 or crops.dtype != np.uint8:
        raise ValueError(f"crops must be uint8 (N, S, S, 3), got {crops.dtype}{crops.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rgb = torch.from_numpy(np.ascontiguousarray(crops[..., ::-1].transpose(0, 3, 1, 2)))

    def run(x: torch.Tensor) -> np.ndarray:
        try:
            out = embed(x)
        except NonFiniteEmbeddingError as exc:  # keep the finite rows
            if exc.output is None:
                raise
            out = exc.output
        if isinstance(out, torch.Tensor):
            out = out.detach().float().cpu().numpy()
        return np.asarray(out, dtype=np.float64)

    parts = []
    for start in range(0, len(rgb), batch_size):
        x = normalize_pixels(rgb[start : start + batch_size])
        parts.append(run(x) + run(torch.flip(x, dims=[3])))
    if not parts:
        return np.zeros((0, 0), np.float32), np.zeros(0, bool)
    summed = np.concatenate(parts)
    with np.errstate(all="ignore"):
        emb = l2_normalize(summed)
    finite = np.isfinite(emb).all(axis=1)
    emb[~finite] = np.nan
    return emb.astype(np.float32), finite


def embed_aligned(
    embed: Embedder,
    crops_bgr: np.ndarray,
    batch_size: int = 64,
    *,
    names: Sequence[str] | None = None,
) -> np.ndarray:
    """Flip-test embeddings of aligned crops (:func:`embed_aligned_rows`), all finite.

    Args:
        embed: an :data:`~eval.extract.Embedder`.
        crops_bgr: uint8 ``(N, S, S, 3)`` BGR crops (as ``FaceFinder`` makes them).
        names: the crops' names (their photos) for the error.
    Returns:
        float32 ``(N, D)`` unit rows: ``emb(x) + emb(mirror(x))``, L2-normalised.
    Raises:
        NonFiniteEmbeddingError: a row is NaN or infinite; names the model and the crops.
    """
    emb, finite = embed_aligned_rows(embed, crops_bgr, batch_size)
    if not finite.all():
        rows = np.flatnonzero(~finite).tolist()
        inputs = [names[r] for r in rows] if names is not None else [f"crop {r}" for r in rows]
        raise NonFiniteEmbeddingError(embedder_name(embed), rows, len(finite), None, inputs)
    return emb


def resize_crop(bgr: np.ndarray, size: int) -> np.ndarray:
    """An already aligned face, brought to ``size x size`` (area interpolation)."""
    if bgr.shape[:2] == (size, size):
        return bgr
    return cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA)
