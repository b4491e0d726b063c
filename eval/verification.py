"""Pair verification on ``.bin`` targets (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW): the
command. The library (also used by the trainer's periodic evaluation) is
:mod:`eval.pair_verification`.

Command line (``torchrun --nproc_per_node N -m eval.verification ...`` shares
the extraction across ranks)::

    python -m eval.verification --network r50 --checkpoint backbone.pt \
        --bin lfw.bin --bin cfp_fp.bin --json results.json
    python -m eval.verification --onnx model.onnx --bin lfw.bin

An ONNX model on the CPU runs onnxruntime with one intra-op thread per usable core (of
the rank's share under torchrun) and, without ``--batch-size``, at the batch that
measures fastest per image on the first target's first images (of 1, 8, 32, 64, 128;
a model with a fixed batch runs at its batch): one line on stderr says which.

A target must hold at least ``--nfolds`` pairs, genuine and impostor ones both; an
embedding that is NaN or infinite is an error naming the model and the ``.bin``'s image,
never an accuracy. ``--json`` is always valid JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from common.cli import run_main
from common.face_input import ARCFACE_INPUT
from eval.onnx_options import MAX_INPUT_SIDE, add_input_arguments, input_options

#: Images per model call when ``--batch-size`` is not given (and not measured).
DEFAULT_BATCH = 128


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.verification",
        description="10-fold pair verification on .bin targets (LFW, CFP-FP, AgeDB-30, ...).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"images per model call; default: {DEFAULT_BATCH}, or for an ONNX model on the "
        "CPU the batch that measures fastest",
    )
    p.add_argument(
        "--image-size", type=int, default=ARCFACE_INPUT.size, help="side the images are read at"
    )
    p.add_argument("--nfolds", type=int, default=10, help="folds of the protocol")
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
    if (args.batch_size is not None and args.batch_size < 1) or args.nfolds < 1:
        p.error("--batch-size and --nfolds must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Command-line entry point; returns the results (also printed, and written with --json)."""
    args = _parse_args(argv)
    from eval.bin_io import load_bin
    from eval.jsonio import write_json
    from eval.models import command_embedder
    from eval.pair_verification import fastest_batch, format_result, verify_pairset

    onnx_input = input_options(args)
    with command_embedder(args.network, args.checkpoint, args.onnx, args.device, onnx_input) as (
        ctx,
        embed,
    ):
        results: dict[str, dict[str, float]] = {}
        size = (args.image_size, args.image_size)
        batch_size = args.batch_size
        for path in args.bin:
            pairs = load_bin(path, size)
            if batch_size is None:
                batch_size, why = fastest_batch(embed, pairs.images, DEFAULT_BATCH)
                if ctx.is_main:
                    print(why, file=sys.stderr, flush=True)
            results[pairs.name] = verify_pairset(embed, pairs, batch_size, None, args.nfolds)
            if ctx.is_main:
                print(format_result(pairs.name, results[pairs.name]), flush=True)
        if args.json and ctx.is_main:
            write_json(args.json, results)
        return results


if __name__ == "__main__":
    sys.exit(run_main(main, prog="eval.verification"))
