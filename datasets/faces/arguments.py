"""The command-line options of face finding, shared by every command that finds faces
(``datasets.prepare``, ``eval.compare``, ``eval.embed``): :func:`add_face_arguments`
declares them, :func:`face_options` turns the parsed flags into
:class:`~datasets.faces.options.FaceOptions`."""

from __future__ import annotations

import argparse

from common.face_input import ARCFACE_INPUT
from datasets.faces.detection import POLICIES
from datasets.faces.options import DEFAULT_MAX_PIXELS, FaceOptions

#: The one default of ``--min-size`` (pixels, the shorter side of a face's box), shared
#: by every command that finds faces: :class:`FaceOptions`' own default.
DEFAULT_MIN_SIZE: float = FaceOptions.min_size


def add_face_arguments(p: argparse.ArgumentParser, min_size: float = DEFAULT_MIN_SIZE) -> None:
    """The :class:`FaceOptions` flags, their defaults shown in ``--help``; ``min_size``:
    the default of ``--min-size`` (leave it: :data:`DEFAULT_MIN_SIZE` is shared)."""
    p.add_argument(
        "--detector",
        default="mtcnn",
        help="'mtcnn' (built in) or an insightface SCRFD/RetinaFace .onnx (det_10g.onnx) "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--policy",
        default="largest",
        choices=POLICIES,
        help="face to keep in a photo with several: largest box, most central, or "
        "none (single: reject the photo) (default: %(default)s)",
    )
    p.add_argument(
        "--min-size",
        type=float,
        default=min_size,
        help="smallest face kept: shorter side of its box in pixels (default: %(default)s)",
    )
    p.add_argument(
        "--min-score",
        type=float,
        default=None,
        help="smallest detection score kept (default: MTCNN 0.9, SCRFD 0.5)",
    )
    p.add_argument(
        "--max-side",
        type=int,
        default=1280,
        help="detect on a copy no larger than this (alignment reads the full photo) "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="refuse photos whose header announces more pixels (width x height) as "
        "too_large, before decoding; bounds a worker's memory (default: 40 megapixels)",
    )


def face_options(args: argparse.Namespace, image_size: int = ARCFACE_INPUT.size) -> FaceOptions:
    """:class:`FaceOptions` from parsed :func:`add_face_arguments` flags, for aligned
    crops of ``image_size`` pixels. Raises ``ValueError`` naming the bad option."""
    return FaceOptions(
        detector=args.detector,
        policy=args.policy,
        min_size=args.min_size,
        min_score=args.min_score,
        max_side=args.max_side,
        image_size=image_size,
        max_pixels=getattr(args, "max_pixels", DEFAULT_MAX_PIXELS),
    )
