"""The ``--input-*`` options of an ONNX model's input convention, the largest input side
and the exporters' names (argparse only, so that a command's ``--help`` answers without
importing onnxruntime or torch).

:class:`eval.onnx_infer.OnnxEmbedder` reads them (``input_mean``, ``input_std``,
``input_color``, ``input_size``); left out, the model's metadata, then its graph, then
the insightface convention decide.
"""

from __future__ import annotations

import argparse
from typing import Any

#: The largest side of a model input (and of ``--input-size``/``--image-size``), in
#: pixels: evaluation feeds aligned face crops (112 for the ArcFace template), and a
#: 1024x1024 float input already takes 12 MiB per face. The one cap of model input sizes.
MAX_INPUT_SIDE = 1024


#: The metadata key that marks an ONNX file exported by this project
#: (:func:`eval.onnx_export.normalization_metadata` writes it in every export).
OUR_EXPORT_KEY = "input_formula"

#: The ONNX exporters of :func:`eval.onnx_export.export_onnx` (``--exporter``): torch's
#: ``dynamo`` (torch.export) and its legacy ``torchscript`` one.
EXPORTERS = ("dynamo", "torchscript")


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
