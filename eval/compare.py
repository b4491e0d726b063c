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

The threshold is ``--threshold`` or is calibrated on a verification ``.bin`` (LFW
format): the pairs' squared distances ``2 - 2 cos`` of flip-test embeddings, the
distance at which the impostor pairs' false-accept rate reaches ``--far`` on the grid
``0, 0.001, ..., 3.999`` (linear interpolation between the grid points that bracket it:
:func:`eval.metrics.threshold_at_far`, the rule of the protocol's VAL@FAR), as a cosine
``1 - d / 2``.

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
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.cli import run_main
from common.errors import UserError
from common.face_input import ARCFACE_INPUT
from datasets.faces.arguments import add_face_arguments
from datasets.faces.finder import FaceFinder, FaceResult
from datasets.faces.photos import PhotoError, read_photo
from eval.bin_io import BinFileError, load_bin
from eval.extract import Embedder
from eval.faces import embed_aligned, finder_options, open_model, printable, resize_crop
from eval.jsonio import write_json
from eval.metrics import VAL_THRESHOLDS_STEP, pair_distances, threshold_at_far
from eval.onnx_infer import add_input_arguments, input_options


class NoFaceError(UserError, ValueError):
    """A photo gave no face to compare: ``<photo>: <reason>: <detail>``."""


@dataclass
class Calibration:
    """A cosine threshold calibrated on a ``.bin`` at a target false-accept rate.

    Attributes:
        threshold: cosine similarity above which two faces are the same person.
        far_target: the false-accept rate asked for.
        far: the rate measured on the ``.bin``'s impostor pairs at ``threshold``.
        tar: the true-accept rate measured on its genuine pairs (None without any).
        genuine, impostor: pair counts.
        name: the ``.bin``'s name.
    """

    threshold: float
    far_target: float
    far: float
    tar: float | None
    genuine: int
    impostor: int
    name: str


def calibrate(
    embed: Embedder,
    bin_path: str | os.PathLike[str],
    far: float,
    image_size: int = ARCFACE_INPUT.size,
    batch_size: int = 64,
) -> Calibration:
    """The cosine threshold at which impostor pairs of ``bin_path`` reach ``far`` (see
    the module docstring). Raises :class:`~eval.bin_io.BinFileError` if the ``.bin`` has
    no impostor pairs, :class:`~eval.errors.NonFiniteEmbeddingError` naming its images."""
    path = os.fspath(bin_path)
    pairs = load_bin(bin_path, (image_size, image_size))
    same = np.asarray(pairs.issame, dtype=bool)
    if not (~same).any():
        raise BinFileError(f"{path}: no impostor pairs to calibrate a FAR on")
    crops = pairs.images.numpy().transpose(0, 2, 3, 1)[..., ::-1]  # RGB NCHW -> BGR NHWC
    names = [f"{printable(path)}: bins[{i}]" for i in range(len(crops))]
    emb = embed_aligned(embed, np.ascontiguousarray(crops), batch_size, names=names)
    dist = pair_distances(emb.astype(np.float64))
    thresholds = np.arange(0, 4, VAL_THRESHOLDS_STEP)
    impostor = np.sort(dist[~same])
    far_curve = np.searchsorted(impostor, thresholds, side="left") / impostor.size
    t = threshold_at_far(thresholds, far_curve, far)
    return Calibration(
        threshold=1.0 - t / 2.0,
        far_target=far,
        far=float(np.mean(dist[~same] < t)),
        tar=float(np.mean(dist[same] < t)) if same.any() else None,
        genuine=int(same.sum()),
        impostor=int((~same).sum()),
        name=printable(pairs.name),
    )


def face_of(finder: FaceFinder | None, path: str, image_size: int) -> FaceResult:
    """The aligned face of one photo (``finder=None``: the photo is an aligned crop)."""
    if finder is None:
        try:
            crop = resize_crop(read_photo(path), image_size)
        except PhotoError as exc:
            raise NoFaceError(str(exc)) from exc
        return FaceResult(None, crop=crop, photo_size=crop.shape[:2])
    r = finder.find_file(path)
    if not r.ok:
        raise NoFaceError(f"{path}: {r.reason}: {r.detail}")
    return r


def compare(
    embed: Embedder, finder: FaceFinder | None, a: str, b: str, image_size: int = ARCFACE_INPUT.size
) -> tuple[float, FaceResult, FaceResult]:
    """``(cosine similarity, face of a, face of b)``.

    Raises:
        NoFaceError: a photo without a face.
        NonFiniteEmbeddingError: the model gave NaN or infinity (names it and the photo).
    """
    fa, fb = face_of(finder, a, image_size), face_of(finder, b, image_size)
    assert fa.crop is not None and fb.crop is not None
    emb = embed_aligned(embed, np.stack([fa.crop, fb.crop]), names=[printable(a), printable(b)])
    return float(np.dot(emb[0].astype(np.float64), emb[1].astype(np.float64))), fa, fb


def _describe(path: str, r: FaceResult, policy: str) -> str:
    path = printable(path)
    if r.box is None:
        return f"{path}: aligned crop"
    box = ",".join(f"{v:.0f}" for v in r.box)
    several = f"; {r.faces} faces, kept the {policy} one" if r.faces > 1 else ""
    return f"{path}: face score {r.score:.3f} at box {box}{several}"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.compare",
        description="Cosine similarity of the faces of two photos, and same/different.",
    )
    p.add_argument("photo_a")
    p.add_argument("photo_b")
    p.add_argument("--model", required=True, help="ONNX file, or a backbone checkpoint")
    p.add_argument("--network", help="backbone name for a checkpoint (r50, mbf, ...)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--threshold", type=float, help="cosine similarity above which: same")
    how.add_argument("--calibrate-bin", help="calibrate the threshold on this .bin (LFW format)")
    p.add_argument("--far", type=float, default=1e-3, help="false-accept rate to calibrate at")
    p.add_argument("--aligned", action="store_true", help="the photos are aligned crops")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--batch-size", type=int, default=64, help="for --calibrate-bin")
    p.add_argument("--json", help="also write the result here")
    add_face_arguments(p, min_size=20.0)
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
    embed, size = open_model(args.model, args.network, args.device, input_options(args))
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
    print(_describe(args.photo_a, fa, args.policy))
    print(_describe(args.photo_b, fb, args.policy))
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
    elif threshold is not None:
        print(f"threshold {threshold:.4f} (given)")
    if threshold is None:
        out["same"] = None
        print("no threshold: give --threshold or --calibrate-bin for a same/different answer")
    else:
        out["threshold"] = threshold
        out["same"] = bool(sim > threshold)
        print("same person" if out["same"] else "different people")
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    sys.exit(run_main(main, prog="eval.compare"))
