"""IJB-B / IJB-C 1:1 template verification or 1:N identification: the command. The
protocol (face features, template pooling, scores, TAR@FAR, TPIR@FPIR and CMC) is
:mod:`eval.ijb_protocol`'s; the data files are read by :mod:`eval.ijb_data`.

Command (``torchrun --nproc_per_node N -m eval.ijb ...`` shares the face
embedding across ranks; rank 0 writes)::

    python -m eval.ijb --root /data/IJBC --target IJBC \
        --network r100 --checkpoint backbone.pt --output-dir out/ijbc
    python -m eval.ijb --root /data/IJBB --target IJBB --onnx model.onnx --output-dir out/ijbb

writes ``<target>_scores.npy`` (one float64 score per line of the pair file,
in order), ``<target>_roc.png`` and ``<target>_result.json`` (TAR@FAR table)
to the output directory and prints the table.

``--protocol 1n`` runs IJB-B/C 1:N identification instead (docs/eval.md, "IJB-B/C 1:N
identification"): writes ``<target>_1n_result.json``, ``<target>_1n_cmc.png`` and
``<target>_1n_ranks.npz``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from common.cli import run_main
from eval.onnx_options import add_input_arguments, input_options

if TYPE_CHECKING:
    from eval.ijb_protocol import IJB1NResult, IJBResult


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.ijb",
        description="IJB-B/C 1:1 verification or 1:N identification.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--root", required=True, help="IJB root with loose_crop/ and meta/")
    p.add_argument(
        "--protocol",
        default="1:1",
        choices=["1:1", "1n"],
        help="1:1 template verification (default) or 1n identification (G1+G2, mixed probes)",
    )
    p.add_argument("--target", default="IJBC", choices=["IJBC", "IJBB"], help="which set")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint",
        "--model",
        dest="checkpoint",
        help="backbone state_dict saved with torch.save, or a model folder (eval.export)",
    )
    src.add_argument("--onnx", help="an ONNX model: exported by eval.export_onnx, or insightface's")
    p.add_argument("--network", help="backbone name for --checkpoint")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--batch-size", type=int, default=128, help="faces per model call")
    p.add_argument("--workers", type=int, default=4, help="image reading/alignment threads")
    p.add_argument(
        "--chunk-size",
        type=int,
        default=32768,
        help="pairs scored per chunk (1:1); gallery templates per chunk (1n)",
    )
    p.add_argument(
        "--device",
        default=None,
        help="default: cuda:LOCAL_RANK when CUDA is available, else cpu ('cuda' = cuda:LOCAL_RANK)",
    )
    p.add_argument("--no-flip", action="store_true", help="skip the mirrored embedding")
    p.add_argument("--no-faceness", action="store_true", help="skip faceness weighting")
    p.add_argument("--no-progress", action="store_true")
    add_input_arguments(p)
    args = p.parse_args(argv)
    if not args.onnx and any(v is not None for v in input_options(args).values()):
        p.error("--input-mean/--input-std/--input-color/--input-size apply to --onnx models only")
    if args.checkpoint and not args.network and not os.path.isdir(args.checkpoint):
        p.error("--network is required with --checkpoint (unless it is a model folder)")
    if min(args.batch_size, args.workers, args.chunk_size) < 1:
        p.error("--batch-size, --workers and --chunk-size must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> IJBResult | IJB1NResult:
    """Command-line entry point."""
    args = _parse_args(argv)
    from eval.ijb_data import read_1n_meta, read_ijb_meta
    from eval.ijb_protocol import (
        IJB1NResult,
        evaluate_ijb,
        evaluate_ijb_1n,
        format_1n_table,
        format_table,
        write_1n_outputs,
        write_outputs,
    )
    from eval.models import command_embedder

    one_n = args.protocol == "1n"
    meta = read_ijb_meta(args.root, args.target, pairs=not one_n)
    sets = read_1n_meta(args.root, meta, args.target) if one_n else None
    onnx_input = input_options(args)
    with command_embedder(args.network, args.checkpoint, args.onnx, args.device, onnx_input) as (
        ctx,
        embed,
    ):
        common = {
            "batch_size": args.batch_size,
            "flip": not args.no_flip,
            "faceness": not args.no_faceness,
            "workers": args.workers,
            "chunk_size": args.chunk_size,
            "progress": not args.no_progress and ctx.is_main,
        }
        result: IJBResult | IJB1NResult
        if sets is not None:
            result = evaluate_ijb_1n(embed, meta, sets, **common)
        else:
            result = evaluate_ijb(embed, meta, **common)
        if ctx.is_main:  # every rank has the same result; one writes it
            if isinstance(result, IJB1NResult):
                paths = write_1n_outputs(result, args.output_dir, args.target)
                print(format_1n_table(args.target, result))
            else:
                paths = write_outputs(result, args.output_dir, args.target)
                print(format_table(args.target, result.tar_at_far))
            for kind, path in paths.items():
                print(f"{kind}: {path}")
        return result


if __name__ == "__main__":
    sys.exit(run_main(main, prog="eval.ijb"))
