"""Batched flip-test embedding extraction, optionally shared across ranks.

An *embedder* is any callable mapping a float32 ``(B, 3, H, W)`` tensor of RGB
pixels in ``[-1, 1]`` to a ``(B, D)`` tensor. :func:`module_embedder` wraps a
backbone (eval mode, no grad, DDP unwrapped); ``eval.onnx_infer`` provides one
for ONNX models.

Under ``torch.distributed`` every rank embeds one contiguous slice of the
images and the slices are ``all_gather``-ed, so all ranks end up with the full
result. Without an initialised process group everything runs locally.

The evaluation commands' embedders check what their model returns
(:func:`check_embeddings`, the one home of that check: :class:`CheckedEmbedder` for
backbones, :class:`eval.onnx_infer.OnnxEmbedder` for ONNX files): anything but a
``(B, D)`` output is a :class:`~eval.errors.ModelError`, and a NaN or infinite
embedding a :class:`~eval.errors.NonFiniteEmbeddingError` naming the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from common.dist import rank_and_world_size
from eval.errors import ModelError, NonFiniteEmbeddingError

Embedder = Callable[[torch.Tensor], torch.Tensor]
_Out = TypeVar("_Out", torch.Tensor, np.ndarray)


def check_embeddings(out: _Out, model: str, batch: int) -> _Out:
    """``out`` if it is a finite ``(batch, D)`` output of ``model``.

    Raises:
        ModelError: another shape (names the model and the shape).
        NonFiniteEmbeddingError: a row holds NaN or infinity (names the model; carries
            the rows and ``out``, so a caller can keep the finite rows).
    """
    shape = tuple(out.shape)
    if len(shape) != 2 or shape[0] != batch:
        raise ModelError(
            f"{model}: output of shape {list(shape)} for a batch of {batch}; expected "
            "(batch, D) embeddings"
        )
    if isinstance(out, torch.Tensor):
        finite = torch.isfinite(out).all(dim=1).cpu().numpy()
    else:
        finite = np.isfinite(out).all(axis=1)
    if not finite.all():
        raise NonFiniteEmbeddingError(model, np.flatnonzero(~finite).tolist(), batch, out)
    return out


def embedder_name(embed: object) -> str:
    """The model's name in messages: ``embed.name`` (its file), "" when it has none."""
    name = getattr(embed, "name", None)
    return name if isinstance(name, str) else ""


class CheckedEmbedder:
    """An embedder whose outputs are checked by :func:`check_embeddings`.

    Args:
        embed: any :data:`Embedder` (e.g. :func:`module_embedder` of a backbone).
        name: the model's name in messages (its checkpoint file).
    """

    def __init__(self, embed: Embedder, name: str) -> None:
        self.embed = embed
        self.name = name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return check_embeddings(self.embed(x), self.name, x.shape[0])


def normalize_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` RGB -> float32 in ``[-1, 1]`` via ``(x / 255 - 0.5) / 0.5``."""
    return ((images.float() / 255.0) - 0.5) / 0.5


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the module inside DDP / DataParallel wrappers (their forward may do collectives)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU if it has none)."""
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def module_embedder(model: nn.Module) -> Embedder:
    """Wrap a backbone as an embedder: inputs moved to its device, float32 outputs.

    The caller is responsible for eval mode (see :func:`eval_mode`); this does
    not change the module's state.
    """
    inner = unwrap_model(model)
    device = model_device(inner)

    def embed(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return inner(x.to(device, non_blocking=True)).float()

    return embed


def rank_slice(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` of ``n`` items for ``rank``; earlier ranks get the remainder."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _gather_device(group: dist.ProcessGroup | None) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_rows(local: torch.Tensor, n: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's :func:`rank_slice` rows ``(n_r, ...)`` into ``(n, ...)``."""
    _, world = rank_and_world_size(group)
    sizes = [rank_slice(n, r, world) for r in range(world)]
    max_rows = max(stop - start for start, stop in sizes)
    device = _gather_device(group)
    padded = torch.zeros((max_rows, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=group)
    parts = [o[: stop - start].cpu() for o, (start, stop) in zip(out, sizes, strict=True)]
    return torch.cat(parts, 0)


def gather_slices(local: torch.Tensor, n: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Every rank's :func:`rank_slice` of ``n`` rows, concatenated: ``(n, D)`` on CPU.

    ``local`` is this rank's ``(stop - start, D)`` float rows (``(0, 0)`` or ``(0, D)``
    for an empty slice). A collective: every rank of ``group`` must call it. NCCL
    groups exchange on the current CUDA device (set by
    ``common.dist.init_distributed``), gloo groups on CPU.
    """
    # Ranks with an empty slice do not know D: agree on it first.
    dim = torch.tensor([local.shape[1] if local.numel() else 0], device=_gather_device(group))
    dist.all_reduce(dim, op=dist.ReduceOp.MAX, group=group)
    d = int(dim.item())
    if local.numel() == 0:
        local = torch.zeros((0, d), dtype=local.dtype)
    return _all_gather_rows(local, n, group)


def _embed_local(
    embed: Embedder,
    images: torch.Tensor,
    batch_size: int,
    flip: bool,
    names: Callable[[int], str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    outs: list[torch.Tensor] = []
    flips: list[torch.Tensor] = []

    def run(x: torch.Tensor, start: int) -> torch.Tensor:
        try:
            return embed(x).detach().float().cpu()
        except NonFiniteEmbeddingError as exc:
            if names is None:
                raise
            raise exc.naming([names(start + r) for r in exc.rows]) from None

    for start in range(0, images.shape[0], batch_size):
        x = normalize_pixels(images[start : start + batch_size])
        outs.append(run(x, start))
        if flip:
            flips.append(run(torch.flip(x, dims=[3]), start))
    if not outs:
        return torch.zeros((0, 0)), (torch.zeros((0, 0)) if flip else None)
    return torch.cat(outs), (torch.cat(flips) if flip else None)


def extract_embeddings(
    embed: Embedder,
    images: torch.Tensor,
    batch_size: int = 128,
    *,
    flip: bool = True,
    group: dist.ProcessGroup | None = None,
    names: Callable[[int], str] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw embeddings of ``images`` and of their horizontal mirrors, rank-shared.

    Args:
        embed: an :data:`Embedder` (see :func:`module_embedder`).
        images: ``(N, 3, H, W)`` uint8 RGB.
        batch_size: images per forward pass (per rank).
        flip: also embed the mirrored images.
        group: process group to share the work in; ``None`` means the default
            group if ``torch.distributed`` is initialised, else local work.
            Every rank of the group must call this with the same ``images``.
        names: ``names(i)`` is image ``i``'s name in a
            :class:`~eval.errors.NonFiniteEmbeddingError` (when ``embed`` raises one).
    Returns:
        ``(emb, emb_flip)``: float32 ``(N, D)`` arrays, identical on every rank
        (``emb_flip`` is ``None`` when ``flip`` is False).
    """
    if images.ndim != 4 or images.dtype != torch.uint8:
        got = f"{images.dtype}{tuple(images.shape)}"
        raise ValueError(f"images must be uint8 (N, 3, H, W), got {got}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = images.shape[0]
    rank, world = rank_and_world_size(group)
    start, stop = rank_slice(n, rank, world)
    named = None if names is None else (lambda i: names(start + i))
    emb, emb_flip = _embed_local(embed, images[start:stop], batch_size, flip, named)
    if world > 1:
        emb = gather_slices(emb, n, group)
        if flip:
            assert emb_flip is not None
            emb_flip = gather_slices(emb_flip, n, group)
    return emb.numpy(), (emb_flip.numpy() if emb_flip is not None else None)
