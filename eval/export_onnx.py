"""Export a backbone to ONNX.

::

    python -m eval.export_onnx --network r50 --checkpoint backbone.pt --output r50.onnx
    python -m eval.export_onnx --network mbf --output mbf.onnx   # random weights (testing)

The command; the library is :mod:`eval.onnx_export`. The graph has one input ``input``
(float32 ``(batch, 3, H, W)``, RGB in ``[-1, 1]``) and one output ``embedding`` (float32
``(batch, D)``, not normalised), with a dynamic batch axis. The input normalisation, the
network's input spec in the backbone registry (:func:`backbones.registry.input_spec`), is
stored in the model metadata so consumers need not guess it::

    input_mean = 127.5, input_std = 127.5   # input = (pixel - mean) / std, pixel in 0..255
    input_color = RGB, input_layout = NCHW, input_size = 112x112

At the end the exported file is run with onnxruntime on random inputs of two
batch sizes and the maximum absolute difference to PyTorch is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from common.cli import run_main
from eval.onnx_options import EXPORTERS, MAX_INPUT_SIDE


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.export_onnx",
        description="Export a backbone to ONNX.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--network", required=True, help="backbone name (r50, r100, mbf, vit_t, ...)")
    p.add_argument(
        "--checkpoint",
        help="backbone weights (.pt/.pth/.safetensors, ours or arcface_torch's; the "
        "embedding size is read from them); random weights if omitted",
    )
    p.add_argument("--output", required=True, help="the .onnx file to write")
    p.add_argument(
        "--image-size", type=int, default=None, help="input side (default: the network's, 112)"
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (exporter default if unset)")
    p.add_argument(
        "--exporter",
        choices=EXPORTERS,
        default="dynamo",
        help="dynamo (torch.export; default) or torchscript (torch's legacy exporter, faster)",
    )
    args = p.parse_args(argv)
    if args.image_size is not None and not 1 <= args.image_size <= MAX_INPUT_SIDE:
        p.error(f"--image-size must be 1 to {MAX_INPUT_SIDE} pixels, got {args.image_size}")
    return args


def main(argv: Sequence[str] | None = None) -> float:
    """Command-line entry point; returns the onnxruntime-vs-PyTorch max abs difference."""
    args = _parse_args(argv)
    from backbones.registry import input_spec
    from eval.models import build_backbone
    from eval.onnx_export import check_parity, export_onnx

    model = build_backbone(args.network, args.checkpoint)
    spec = input_spec(args.network)
    side = args.image_size or spec.size
    size = (side, side)
    meta = {"network": args.network}
    if args.checkpoint:
        meta["checkpoint"] = os.path.basename(args.checkpoint)
    export_onnx(
        model, args.output, spec=spec, image_size=size, metadata=meta, opset=args.opset,
        exporter=args.exporter,
    )  # fmt: skip
    diff = check_parity(model, args.output, image_size=size)
    print(f"wrote {args.output}")
    print(f"onnxruntime vs PyTorch max abs diff: {diff:.3e}")
    return diff


if __name__ == "__main__":
    sys.exit(run_main(main, prog="eval.export_onnx"))
