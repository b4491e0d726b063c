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
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Mapping, Sequence

import numpy as np
import torch.distributed as dist
from torch import nn

from common.atomic import write_json
from eval.bin_io import PairSet, RestrictedUnpickler, load_bin, restricted_loads
from eval.extract import Embedder, eval_mode, extract_embeddings, module_embedder
from eval.metrics import evaluate, l2_normalize
from eval.onnx_infer import add_input_arguments, input_options

__all__ = [
    "PairSet",
    "RestrictedUnpickler",
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


def _as_embedder(model: nn.Module | Embedder) -> Embedder:
    return module_embedder(model) if isinstance(model, nn.Module) else model


def verify_pairset(
    model: nn.Module | Embedder,
    pairs: PairSet,
    batch_size: int = 128,
    group: dist.ProcessGroup | None = None,
    nrof_folds: int = 10,
) -> dict[str, float]:
    """Flip-test extraction (rank-shared) and :func:`summarize` for one target."""
    embed = _as_embedder(model)
    if isinstance(model, nn.Module):
        with eval_mode(model):
            emb, emb_flip = extract_embeddings(embed, pairs.images, batch_size, group=group)
    else:
        emb, emb_flip = extract_embeddings(embed, pairs.images, batch_size, group=group)
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
    src.add_argument("--checkpoint", help="backbone state_dict saved with torch.save")
    src.add_argument("--onnx", help="an ONNX model: exported by eval.export_onnx, or insightface's")
    p.add_argument("--network", help="backbone name for --checkpoint (r50, r100, mbf, ...)")
    p.add_argument("--bin", action="append", required=True, help="a .bin target (repeatable)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=112)
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
    if args.checkpoint and not args.network:
        p.error("--network is required with --checkpoint")
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
    try:
        main()
    except (ValueError, FileNotFoundError, pickle.UnpicklingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
