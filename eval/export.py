"""Export a trained backbone as a model folder that loads anywhere.

::

    python -m eval.export work_dirs/demo --out models/demo-mbf_tiny
    python -m eval.export work_dirs/demo/checkpoints/step-000374 --out models/demo
    python -m eval.export backbone.pth --network r50 --out models/r50   # a bare weights file

``DIR_OR_CHECKPOINT`` is a training output directory (its ``config.json``, ``backbone.pt``
or ``backbone.safetensors`` and ``verification.json``), a checkpoint directory or its
``trainer.pt`` (the config and verification history it records), or a weights file
(``--network``, unless a training ``config.json`` lies next to it). ``MODEL_DIR`` gets
(:mod:`backbones.pretrained`; the library is :mod:`eval.model_folder`):

* ``model.safetensors``: the backbone with arcface_torch's parameter names;
* ``config.json``: network, embedding size, the input spec (size, mean, std, colour order),
  the training data, the head and margin, the recipe and the project's version;
* ``model.onnx``: the same input spec in its metadata (:mod:`eval.export_onnx`), checked
  against PyTorch with onnxruntime;
* ``README.md``: a model card with the verification results recorded during training, the
  recipe, and a licence field left for the user to fill in.

``backbones.pretrained.from_pretrained(MODEL_DIR)`` and the evaluation commands
(``--model MODEL_DIR``, or ``--checkpoint MODEL_DIR``) load it. The layout is what
``huggingface_hub``'s ``upload_folder(folder_path=MODEL_DIR, repo_id=...)`` publishes as
is.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from common.cli import run_main
from eval.onnx_options import EXPORTERS


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.export",
        description="Write a model folder (weights, config, ONNX, model card) from a training "
        "run, a checkpoint or a weights file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "source",
        metavar="DIR_OR_CHECKPOINT",
        help="a training output directory, a checkpoint directory or its trainer.pt, or a "
        "backbone weights file (.pt/.pth/.safetensors, ours or arcface_torch's)",
    )
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="the folder to write")
    p.add_argument(
        "--network", help="backbone name (default: the training config's; needed for a bare file)"
    )
    p.add_argument("--exporter", choices=EXPORTERS, default="dynamo", help="ONNX exporter")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty folder eval.export did not make (other files are kept)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    """Command-line entry point; returns the model folder."""
    args = _parse_args(argv)
    from backbones.pretrained import MODEL_CARD, MODEL_CONFIG, MODEL_ONNX, MODEL_WEIGHTS
    from eval.model_folder import export_folder, find_source

    out, diff = export_folder(
        find_source(args.source),
        args.out,
        network=args.network,
        exporter=args.exporter,
        overwrite=args.overwrite,
    )
    print(f"wrote {out}: {MODEL_WEIGHTS}, {MODEL_CONFIG}, {MODEL_ONNX}, {MODEL_CARD}")
    print(f"onnxruntime vs PyTorch max abs diff: {diff:.3e}")
    return out


if __name__ == "__main__":
    sys.exit(run_main(main, prog="eval.export"))
