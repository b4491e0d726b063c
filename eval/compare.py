"""Are two photos the same person? Detect, align, embed, compare.

::

    python -m eval.compare A.jpg B.jpg --model model.onnx --threshold 0.35
    python -m eval.compare A.jpg B.jpg --model backbone.pt --network r50 \\
        --calibrate-bin data/lfw.bin --far 1e-3

Each photo goes through :class:`datasets.faces.finder.FaceFinder` (MTCNN by default,
one face by ``--policy``, 5-point alignment; ``--aligned`` skips this for crops that are
already aligned), then :func:`eval.faces.embed_aligned` (flip-test embedding,
L2-normalised). Prints the cosine similarity and, given a threshold, ``same person``
(similarity above it) or ``different people``.

The threshold is ``--threshold``, or is calibrated on the spot on a verification
``.bin`` given by ``--calibrate-bin`` (LFW format: the pairs' squared distances
``2 - 2 cos`` of flip-test embeddings, the distance at which the impostor pairs'
false-accept rate reaches ``--far`` on the grid ``0, 0.001, ..., 3.999``, linearly
interpolated between the grid points that bracket it: :func:`eval.metrics.threshold_at_far`,
the rule of the protocol's VAL@FAR, as a cosine ``1 - d / 2``). Without either, the
model's calibration written once by ``eval.calibrate`` is used by default (its entry at
``--far``, else the closest): the one in an ONNX model's metadata (``--into-model``), else
the sidecar ``<model>.calibration.json``; the output says which. One made for another
model (by SHA-256) is refused, naming both hashes.

Failures are one line naming the photo, the model or the file (exit code 1; 2 for a bad
option): a photo without a face (:class:`NoFaceError`), a model that does not load or
gives a NaN or infinite embedding (:class:`~eval.errors.ModelError`,
:class:`~eval.errors.NonFiniteEmbeddingError`): never a similarity. ``--json`` is
always valid JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from common.cli import run_main
from datasets.faces.arguments import add_face_arguments
from eval.calibrate import calibration_source, pick_entry, read_calibration
from eval.errors import NoFaceError
from eval.onnx_options import add_input_arguments, input_options

__all__ = ["NoFaceError", "main"]


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.compare",
        description="Cosine similarity of the faces of two photos, and same/different "
        "(threshold: --threshold, --calibrate-bin, else by default the model's calibration "
        "from eval.calibrate: in its ONNX metadata, else <model>.calibration.json).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("photo_a")
    p.add_argument("photo_b")
    p.add_argument("--model", required=True, help="ONNX file, or a backbone checkpoint")
    p.add_argument("--network", help="backbone name for a checkpoint (r50, mbf, ...)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--threshold", type=float, help="cosine similarity above which: same")
    how.add_argument("--calibrate-bin", help="calibrate the threshold on this .bin (LFW format)")
    p.add_argument(
        "--far",
        type=float,
        default=1e-3,
        help="false-accept rate: of the model's calibration, or to calibrate at",
    )
    p.add_argument("--aligned", action="store_true", help="the photos are aligned crops")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--batch-size", type=int, default=64, help="for --calibrate-bin")
    p.add_argument("--json", help="also write the result here")
    add_face_arguments(p)
    add_input_arguments(p)
    args = p.parse_args(argv)
    if args.threshold is not None and not -1 <= args.threshold <= 1:
        p.error(f"--threshold must be a cosine in [-1, 1], got {args.threshold}")
    if not 0 < args.far < 1:
        p.error(f"--far must be in (0, 1), got {args.far}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        p.error(f"--json {args.json}: its directory does not exist")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns what it printed, as a dict (``--json``'s content)."""
    args = _parse_args(argv)
    from datasets.faces.finder import FaceFinder
    from eval.faces import finder_options, open_model
    from eval.jsonio import printable, write_json
    from eval.photo_pairs import calibrate, compare, describe_face

    embed, size = open_model(args.model, args.network, args.device, input_options(args))
    if hasattr(embed, "describe"):
        print(embed.describe(), file=sys.stderr)  # the input convention, and where from
    record = None
    if args.threshold is None and not args.calibrate_bin:
        record = read_calibration(args.model)  # before any work: refuses another model's
    finder = None if args.aligned else FaceFinder(finder_options(args, size, args.model))
    sim, fa, fb = compare(embed, finder, args.photo_a, args.photo_b, size)
    out: dict[str, Any] = {
        "a": printable(args.photo_a),
        "b": printable(args.photo_b),
        "similarity": sim,
    }
    for key, r in (("face_a", fa), ("face_b", fb)):
        if r.box is not None:
            out[key] = {
                "score": r.score,
                "box": [float(v) for v in r.box],
                "landmarks": [float(v) for v in r.landmarks.ravel()],
                "faces": r.faces,
            }
    print(describe_face(args.photo_a, fa, args.policy))
    print(describe_face(args.photo_b, fb, args.policy))
    print(f"similarity {sim:.4f}")
    threshold = args.threshold
    if args.calibrate_bin:
        cal = calibrate(embed, args.calibrate_bin, args.far, size, args.batch_size)
        threshold = cal.threshold
        out["calibration"] = cal.__dict__
        tar = "n/a" if cal.tar is None else f"{cal.tar:.4f}"
        print(
            f"threshold {threshold:.4f}: calibrated on {cal.name} at FAR {cal.far_target:g} "
            f"(measured FAR {cal.far:.5f}, TAR {tar}; {cal.genuine} genuine, "
            f"{cal.impostor} impostor pairs)"
        )
        if cal.far_target * cal.impostor < 1:
            print(
                f"note: FAR {cal.far_target:g} is below one of {cal.impostor} impostor pairs: "
                "the threshold is interpolated, not measured",
                file=sys.stderr,
            )
    elif record is not None:
        entry = pick_entry(record, args.far)
        threshold = float(entry["threshold"])
        out["calibration"] = {
            "file": printable(record["path"]),
            "source": record["source"],
            "bin": record["bin"],
            **entry,
        }
        tar = "n/a" if entry.get("tar") is None else f"{entry['tar']:.4f}"
        print(
            f"threshold {threshold:.4f}: calibration {calibration_source(record)} at target "
            f"FAR {entry['far_target']:g} (measured FAR {entry['far']:.6f}, TAR {tar}; "
            f"{entry['genuine']} genuine, {entry['impostor']} impostor pairs of "
            f"{printable(record['bin'])})"
        )
        if entry.get("few_impostors"):
            print(
                f"note: the calibration at FAR {entry['far_target']:g} rests on too few "
                f"impostor pairs ({entry['impostor']})",
                file=sys.stderr,
            )
    elif threshold is not None:
        print(f"threshold {threshold:.4f} (given)")
    if threshold is None:
        out["same"] = None
        print(
            "no threshold: give --threshold or --calibrate-bin, or calibrate the model once "
            "(python -m eval.calibrate) for a same/different answer"
        )
    else:
        out["threshold"] = threshold
        out["same"] = bool(sim > threshold)
        print("same person" if out["same"] else "different people")
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    sys.exit(run_main(main, prog="eval.compare"))
