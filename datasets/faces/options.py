"""How a face is found and aligned (:class:`FaceOptions`), with no image library: the
command-line flags (:mod:`datasets.faces.arguments`) build one before any heavy import,
so that a command's ``--help`` answers fast."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from common.face_input import ARCFACE_INPUT
from datasets.faces.detection import POLICIES

#: Photos whose header announces more pixels are refused before decoding (40 megapixels).
DEFAULT_MAX_PIXELS = 40_000_000


@dataclass(frozen=True)
class FaceOptions:
    """How a face is found and aligned.

    Attributes:
        detector: ``"mtcnn"`` (built in) or the path of an insightface SCRFD /
            RetinaFace ``.onnx`` file.
        policy: which face to keep in a photo with several: ``largest`` (box area),
            ``central`` (box centre nearest the photo's centre) or ``single`` (reject
            the photo).
        min_size: smallest face kept, as the shorter side of its box in photo pixels.
            MTCNN does not search below it either (nor below 20 pixels of the detection
            copy), so faces much smaller than this are ``no_face`` rather than ``too_small``.
        min_score: smallest detection score kept; ``None``: the detector's default
            (MTCNN 0.9, SCRFD 0.5).
        max_side: photos whose longer side is larger are detected on a copy resized to
            this (alignment still reads the full photo).
        image_size: side of the aligned square crop (112 for the ArcFace template).
        max_pixels: photos whose header announces more pixels (width x height) are
            refused as ``too_large`` before decoding; files over 4 bytes per pixel of it
            (at least 16 MiB) too. Bounds the memory one photo can take.
    """

    detector: str = "mtcnn"
    policy: str = "largest"
    min_size: float = 40.0
    min_score: float | None = None
    max_side: int = 1280
    image_size: int = ARCFACE_INPUT.size
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"--policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not self.min_size >= 0:
            raise ValueError(f"--min-size must be >= 0 pixels, got {self.min_size}")
        if self.min_score is not None and not 0 <= self.min_score <= 1:
            raise ValueError(f"--min-score must be in [0, 1], got {self.min_score}")
        if not self.max_side >= 64:
            raise ValueError(f"--max-side must be >= 64 pixels, got {self.max_side}")
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"--image-size must be in [16, 1024], got {self.image_size}")
        if not 4096 <= self.max_pixels <= 1 << 30:
            raise ValueError(
                f"--max-pixels must be in [4096, {1 << 30}] (OpenCV's own limit), got "
                f"{self.max_pixels}"
            )
        if self.detector != "mtcnn" and not self.detector.lower().endswith(".onnx"):
            raise ValueError(
                f"--detector must be 'mtcnn' or an insightface .onnx file, got {self.detector!r}"
            )
        if self.detector != "mtcnn" and not os.path.isfile(self.detector):
            raise ValueError(f"--detector {self.detector}: no such file")

    def as_dict(self) -> dict:
        return asdict(self)
