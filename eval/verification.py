"""Pair verification on ``.bin`` targets (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW).

Library use (e.g. the trainer's periodic evaluation)::

    from eval.verification import load_bin, verify_targets
    targets = [load_bin(p) for p in ("lfw.bin", "cfp_fp.bin")]   # once, at start-up
    results = verify_targets(backbone, targets, batch_size=256)  # on every rank
    results["lfw"]["accuracy"], results["lfw"]["xnorm"]

Command line (``torchrun --nproc_per_node N -m eval.verification ...`` shares
the extraction across ranks)::

    python -m eval.verification --network r50 --checkpoint backbone.pt \
        --bin lfw.bin --bin cfp_fp.bin --json results.json
    python -m eval.verification --onnx model.onnx --bin lfw.bin

A target must hold at least ``--nfolds`` pairs, genuine and impostor ones both
(:func:`check_pairset`); an embedding that is NaN or infinite is a
:class:`~eval.errors.NonFiniteEmbeddingError` naming the model and the ``.bin``'s image,
never an accuracy. ``--json`` is always valid JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np
import torch.distributed as dist
from torch import nn

from common.cli import run_main
from common.face_input import ARCFACE_INPUT
from eval.bin_io import BinFileError, PairSet, RestrictedUnpickler, load_bin, restricted_loads
from eval.errors import NonFiniteEmbeddingError
from eval.extract import Embedder, embedder_name, eval_mode, extract_embeddings, module_embedder
from eval.jsonio import write_json
from eval.metrics import evaluate, l2_normalize
from eval.onnx_infer import MAX_INPUT_SIDE, add_input_arguments, input_options

__all__ = [
    "PairSet",
    "RestrictedUnpickler",
    "check_pairset",
    "evaluate",
    "load_bin",
    "main",
    "restricted_loads",
    "summarize",
    "verify_pairset",
    "verify_targets",
]


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


def format_result(name: str, r: Mapping[str, float]) -> str:
    """One log line for a target."""
    return (
        f"[{name}] accuracy-flip {r['accuracy']:.5f} +- {r['accuracy_std']:.5f}  "
        f"VAL {r['val']:.5f} +- {r['val_std']:.5f} @ FAR {r['far']:.5f}  "
        f"XNorm {r['xnorm']:.4f}  ({int(r['num_pairs'])} pairs)"
    )


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.verification",
        description="10-fold pair verification on .bin targets (LFW, CFP-FP, AgeDB-30, ...).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint",
        "--model",
        dest="checkpoint",
        help="backbone state_dict saved with torch.save, or a model folder (eval.export)",
    )
    src.add_argument("--onnx", help="an ONNX model: exported by eval.export_onnx, or insightface's")
    p.add_argument("--network", help="backbone name for --checkpoint (r50, r100, mbf, ...)")
    p.add_argument("--bin", action="append", required=True, help="a .bin target (repeatable)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=ARCFACE_INPUT.size)
    p.add_argument("--nfolds", type=int, default=10)
    p.add_argument(
        "--device",
        default=None,
        help="default: cuda:LOCAL_RANK when CUDA is available, else cpu ('cuda' = cuda:LOCAL_RANK)",
    )
    p.add_argument("--json", help="write the results here (rank 0)")
    add_input_arguments(p)
    args = p.parse_args(argv)
    if not args.onnx and any(v is not None for v in input_options(args).values()):
        p.error("--input-mean/--input-std/--input-color/--input-size apply to --onnx models only")
    if args.checkpoint and not args.network and not os.path.isdir(args.checkpoint):
        p.error("--network is required with --checkpoint (unless it is a model folder)")
    if not 1 <= args.image_size <= MAX_INPUT_SIDE:
        p.error(f"--image-size must be 1 to {MAX_INPUT_SIDE} pixels, got {args.image_size}")
    if args.batch_size < 1 or args.nfolds < 1:
        p.error("--batch-size and --nfolds must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Command-line entry point; returns the results (also printed, and written with --json)."""
    from eval.models import command_embedder

    args = _parse_args(argv)
    onnx_input = input_options(args)
    with command_embedder(args.network, args.checkpoint, args.onnx, args.device, onnx_input) as (
        ctx,
        embed,
    ):
        results: dict[str, dict[str, float]] = {}
        size = (args.image_size, args.image_size)
        for path in args.bin:
            pairs = load_bin(path, size)
            results[pairs.name] = verify_pairset(embed, pairs, args.batch_size, None, args.nfolds)
            if ctx.is_main:
                print(format_result(pairs.name, results[pairs.name]), flush=True)
        if args.json and ctx.is_main:
            write_json(args.json, results)
        return results


if __name__ == "__main__":
    sys.exit(run_main(main, prog="eval.verification"))
