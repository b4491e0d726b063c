"""The ``--input-*`` options of an ONNX model's input convention (argparse only, so that
a command's ``--help`` answers without importing onnxruntime or torch).

:class:`eval.onnx_infer.OnnxEmbedder` reads them (``input_mean``, ``input_std``,
``input_color``, ``input_size``); left out, the model's metadata, then its graph, then
the insightface convention decide.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--input-*`` overrides of an ONNX model's input convention."""
    group = parser.add_argument_group(
        "ONNX input (default: the model's metadata, else what its graph's first ops do, "
        "else the insightface convention (pixel - 127.5) / 127.5, RGB)"
    )
    group.add_argument("--input-mean", type=float, help="model input = (pixel - mean) / std")
    group.add_argument("--input-std", type=float, help="see --input-mean")
    group.add_argument("--input-color", choices=["RGB", "BGR"], help="channel order")
    group.add_argument("--input-size", type=int, help="side of a symbolic-size input")


def input_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``OnnxEmbedder`` keyword arguments given by :func:`add_input_arguments`' flags."""
    return {
        "input_mean": args.input_mean,
        "input_std": args.input_std,
        "input_color": args.input_color,
        "input_size": args.input_size,
    }
