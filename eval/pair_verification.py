"""Pair verification on ``.bin`` targets (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW): the
library of ``eval.verification`` and of the trainer's periodic evaluation.

::

    from eval.bin_io import load_bin
    from eval.pair_verification import verify_targets
    targets = [load_bin(p) for p in ("lfw.bin", "cfp_fp.bin")]   # once, at start-up
    results = verify_targets(backbone, targets, batch_size=256)  # on every rank
    results["lfw"]["accuracy"], results["lfw"]["xnorm"]

A target must hold at least ``nrof_folds`` pairs, genuine and impostor ones both
(:func:`check_pairset`); an embedding that is NaN or infinite is a
:class:`~eval.errors.NonFiniteEmbeddingError` naming the model and the ``.bin``'s image,
never an accuracy. An ONNX model on the CPU runs at the batch that measures fastest
(:func:`fastest_batch`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from eval.bin_io import BinFileError, PairSet
from eval.errors import NonFiniteEmbeddingError
from eval.extract import Embedder, embedder_name, eval_mode, extract_embeddings, module_embedder
from eval.metrics import evaluate, l2_normalize
from eval.onnx_infer import OnnxEmbedder

#: The batch sizes :func:`fastest_batch` measures (those up to the set's size).
BATCH_CANDIDATES = (1, 8, 32, 64, 128)
#: :func:`fastest_batch` times at least this many images per candidate (small batches
#: are called several times).
_MIN_TIMED_IMAGES = 8


def summarize(
    emb: np.ndarray, emb_flip: np.ndarray | None, issame: np.ndarray, nrof_folds: int = 10
) -> dict[str, float]:
    """Protocol numbers from raw embeddings.

    Args:
        emb: ``(2P, D)`` raw embeddings of the images.
        emb_flip: ``(2P, D)`` raw embeddings of the mirrored images, or ``None``
            (then no flip test).
        issame: ``(P,)`` booleans.
    Returns:
        ``accuracy``, ``accuracy_std`` (over folds), ``val``, ``val_std``, ``far``
        (at FAR target 1e-3), ``xnorm`` (mean L2 norm of all raw embeddings,
        flipped ones included) and ``num_pairs``.
    """
    raw = [emb] if emb_flip is None else [emb, emb_flip]
    xnorm = float(np.mean(np.concatenate([np.linalg.norm(e, axis=1) for e in raw])))
    combined = emb if emb_flip is None else emb + emb_flip
    _, _, accuracy, val, val_std, far = evaluate(l2_normalize(combined), issame, nrof_folds)
    return {
        "accuracy": float(np.mean(accuracy)),
        "accuracy_std": float(np.std(accuracy)),
        "val": val,
        "val_std": val_std,
        "far": far,
        "xnorm": xnorm,
        "num_pairs": int(np.asarray(issame).size),
    }


def check_pairset(pairs: PairSet, nrof_folds: int = 10) -> None:
    """Refuse a target the protocol cannot score: fewer pairs than folds, or no genuine
    or no impostor pair (:class:`~eval.bin_io.BinFileError` naming the file and the
    fold count)."""
    n = len(pairs)
    if nrof_folds > 1 and n < nrof_folds:
        raise BinFileError(
            f"{pairs.source}: {n} pair{'s' if n != 1 else ''}, fewer than the {nrof_folds} "
            "folds of the protocol (each fold needs a pair; --nfolds sets the folds)"
        )
    same = np.asarray(pairs.issame, dtype=bool)
    for kind, count in (("genuine", int(same.sum())), ("impostor", int((~same).sum()))):
        if count == 0:
            raise BinFileError(
                f"{pairs.source}: no {kind} pairs among its {n}; verification needs both "
                "genuine and impostor pairs"
            )


def _as_embedder(model: nn.Module | Embedder) -> Embedder:
    return module_embedder(model) if isinstance(model, nn.Module) else model


def verify_pairset(
    model: nn.Module | Embedder,
    pairs: PairSet,
    batch_size: int = 128,
    group: dist.ProcessGroup | None = None,
    nrof_folds: int = 10,
) -> dict[str, float]:
    """Flip-test extraction (rank-shared) and :func:`summarize` for one target.

    Raises:
        BinFileError: the target cannot be scored (:func:`check_pairset`).
        NonFiniteEmbeddingError: a NaN or infinite embedding (names the model and the
            image of the ``.bin``).
    """
    check_pairset(pairs, nrof_folds)
    embed = _as_embedder(model)

    def name(i: int) -> str:
        return f"{pairs.source}: bins[{i}]"

    kwargs = {"group": group, "names": name}
    if isinstance(model, nn.Module):
        with eval_mode(model):
            emb, emb_flip = extract_embeddings(embed, pairs.images, batch_size, **kwargs)
    else:
        emb, emb_flip = extract_embeddings(embed, pairs.images, batch_size, **kwargs)
    combined = emb if emb_flip is None else emb + emb_flip
    finite = np.isfinite(combined).all(axis=1)
    if not finite.all():  # an unchecked embedder, or a flip-test sum that overflowed
        rows = np.flatnonzero(~finite).tolist()
        who = embedder_name(embed) if not isinstance(model, nn.Module) else ""
        raise NonFiniteEmbeddingError(who, rows, len(finite), None, [name(r) for r in rows])
    return summarize(emb, emb_flip, pairs.issame, nrof_folds)


def verify_targets(
    model: nn.Module | Embedder,
    bin_datasets: Mapping[str, PairSet] | Sequence[PairSet],
    batch_size: int = 128,
    group: dist.ProcessGroup | None = None,
    nrof_folds: int = 10,
) -> dict[str, dict[str, float]]:
    """Evaluate ``model`` on every target, sharing extraction across the ranks of ``group``.

    Args:
        model: a backbone (``(B, 3, 112, 112)`` in ``[-1, 1]`` -> ``(B, D)``;
            DDP-wrapped is fine, it is unwrapped and put in eval mode for the
            call, then restored) or any embedder callable.
        bin_datasets: :class:`PairSet` objects from :func:`load_bin`, as a list
            or a ``{name: PairSet}`` mapping.
        batch_size: images per forward pass on each rank.
        group: process group; ``None`` = the default group when
            ``torch.distributed`` is initialised, else single-process. All ranks
            of the group must call this (it does collectives).
        nrof_folds: protocol folds (each target needs at least this many pairs).
    Returns:
        ``{name: {"accuracy", "accuracy_std", "val", "val_std", "far", "xnorm",
        "num_pairs"}}``, identical on every rank.
    """
    items = (
        list(bin_datasets.items())
        if isinstance(bin_datasets, Mapping)
        else [(p.name, p) for p in bin_datasets]
    )
    return {name: verify_pairset(model, p, batch_size, group, nrof_folds) for name, p in items}


def fastest_batch(
    embed: nn.Module | Embedder,
    images: torch.Tensor,
    default: int,
    candidates: Sequence[int] = BATCH_CANDIDATES,
) -> tuple[int, str | None]:
    """The batch size to verify with, and one line saying which and why (None: nothing
    to say).

    An :class:`~eval.onnx_infer.OnnxEmbedder` whose graph fixes the batch runs at it. One
    on the CPU is timed once on the first of ``images`` (uint8 ``(N, 3, H, W)``) at each
    candidate up to ``N``, through the path verification takes
    (:func:`~eval.extract.extract_embeddings`, without the mirror images), after one
    warm-up call: the fastest per image wins. Anything else runs at ``default``.
    """
    if not isinstance(embed, OnnxEmbedder):
        return default, None
    threads = f"{embed.threads or 'default'} intra-op threads"
    if embed.fixed_batch is not None:
        return (
            embed.fixed_batch,
            f"onnx batch {embed.fixed_batch} (the model's fixed batch), {threads}",
        )
    if not embed.on_cpu:
        return default, None
    n = int(images.shape[0])
    sizes = [b for b in candidates if b <= n] or [max(1, n)]
    extract_embeddings(embed, images[:1], 1, flip=False)  # warm-up: the first run is slow
    per_image = {}
    for b in sizes:
        calls = max(1, _MIN_TIMED_IMAGES // b)
        x = images[: b * calls]
        start = time.perf_counter()
        extract_embeddings(embed, x, b, flip=False)
        per_image[b] = (time.perf_counter() - start) / len(x)
    best = min(per_image, key=lambda b: per_image[b])
    tried = ", ".join(f"{b}: {per_image[b] * 1e3:.2f}" for b in sizes)
    return best, (
        f"onnx batch {best} (fastest of ms per image measured on the first images, {tried}), "
        f"{threads}"
    )


def format_result(name: str, r: Mapping[str, float]) -> str:
    """One log line for a target."""
    return (
        f"[{name}] accuracy-flip {r['accuracy']:.5f} +- {r['accuracy_std']:.5f}  "
        f"VAL {r['val']:.5f} +- {r['val_std']:.5f} @ FAR {r['far']:.5f}  "
        f"XNorm {r['xnorm']:.4f}  ({int(r['num_pairs'])} pairs)"
    )
