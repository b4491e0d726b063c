"""From a photo to the one aligned face to keep, or the reason there is none.

:class:`FaceFinder` is what ``datasets.prepare``, ``eval.compare`` and ``eval.embed``
run on every photo: decode (EXIF orientation applied), detect on a copy no larger than
``max_side``, drop faces below ``min_size`` / ``min_score``, choose one by the policy,
align it with the 5-point similarity transform onto the ArcFace template.

Rejection reasons (stable names, used in ``rejected.tsv`` and ``report.json``):

* ``unreadable`` — the file cannot be read or decoded (also: not a JPEG, PNG, WebP or
  BMP file);
* ``not_a_file`` — a FIFO, device, socket or directory (a symlink to one too): never
  opened for reading, so it cannot hang or flood the reader;
* ``too_large`` — the header announces more than ``max_pixels`` pixels, or the file is
  over the matching byte cap: refused before decoding;
* ``no_face`` — the detector found nothing;
* ``too_small`` — faces were found, but none whose box (shorter side) is ``min_size``
  pixels or more among those with a good enough score;
* ``low_score`` — faces were found, but none scoring ``min_score`` or more;
* ``several_faces`` — policy ``single`` and more than one face passed the filters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np

from datasets.faces.align import align_face
from datasets.faces.detection import Detections, FaceDetector, choose_face
from datasets.faces.mtcnn import MTCNN
from datasets.faces.options import FaceOptions
from datasets.faces.photos import (
    PhotoError,
    decode_photo,
    max_bytes_for,
    read_photo_bytes,
)
from datasets.faces.scrfd import SCRFD

REASONS = (
    "unreadable",
    "not_a_file",
    "too_large",
    "no_face",
    "too_small",
    "low_score",
    "several_faces",
)


def open_detector(spec: str, *, min_face_size: float = 20.0, threads: int = 1) -> FaceDetector:
    """``"mtcnn"`` (searching faces from ``min_face_size`` pixels up) or the path of an
    insightface SCRFD / RetinaFace ``.onnx`` file (which finds faces of any size its
    640x640 input resolves)."""
    if spec == "mtcnn":
        return MTCNN(min_face_size=max(20.0, float(min_face_size)), threads=threads)
    if spec.lower().endswith(".onnx"):
        return SCRFD(spec, threads=threads)
    raise ValueError(f"detector must be 'mtcnn' or an insightface .onnx file, got {spec!r}")


@dataclass
class FaceResult:
    """What :meth:`FaceFinder.find` made of one photo.

    Attributes:
        reason: ``None`` when a face was kept, else one of :data:`REASONS`.
        detail: a short human explanation (empty when kept).
        faces: number of faces the detector found (before the size/score filters).
        score: the kept face's detection score.
        box: float64 ``(4,)`` its box, photo pixels.
        landmarks: float64 ``(5, 2)`` its 5 points, photo pixels.
        crop: BGR uint8 ``(S, S, 3)`` the aligned face.
        photo_size: ``(height, width)`` of the photo after EXIF orientation (0, 0 if
            unreadable).
    """

    reason: str | None
    detail: str = ""
    faces: int = 0
    score: float | None = None
    box: np.ndarray | None = None
    landmarks: np.ndarray | None = None
    crop: np.ndarray | None = None
    photo_size: tuple[int, int] = (0, 0)

    @property
    def ok(self) -> bool:
        return self.reason is None


class FaceFinder:
    """Detect, choose and align the face of a photo (see the module docstring).

    Args:
        options: :class:`FaceOptions`.
        threads: onnxruntime threads of the detector (1 = one core, deterministic).
        detector: use this detector instead of building ``options.detector``.
    """

    def __init__(
        self, options: FaceOptions, threads: int = 1, detector: FaceDetector | None = None
    ) -> None:
        self.options = options
        self.detector = detector or open_detector(
            options.detector, min_face_size=options.min_size, threads=threads
        )
        self.min_score = (
            options.min_score if options.min_score is not None else self.detector.default_min_score
        )

    def detect(self, bgr: np.ndarray) -> Detections:
        """All faces of a BGR photo, in its pixels (detected on a copy of at most
        ``max_side``)."""
        h, w = bgr.shape[:2]
        f = min(1.0, self.options.max_side / max(h, w))
        small = bgr
        if f < 1.0:
            size = (max(1, round(w * f)), max(1, round(h * f)))
            small = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
        rgb = cv2.cvtColor(small, cv2.COLOR_BGR2RGB)
        # MTCNN searches from min_size up (in the copy's pixels), never below 20 pixels
        det = self.detector.detect(rgb, min_face_size=max(20.0, self.options.min_size * f))
        if small is not bgr and len(det):
            det = det.scaled(w / small.shape[1], h / small.shape[0])
        return det

    def find(self, bgr: np.ndarray) -> FaceResult:
        """The face to keep in a decoded BGR photo, or why there is none."""
        shape = (int(bgr.shape[0]), int(bgr.shape[1]))
        det = self.detect(bgr)
        if len(det) == 0:
            return FaceResult("no_face", "the detector found no face", 0, photo_size=shape)
        big = det.sizes() >= self.options.min_size
        good = det.scores >= self.min_score
        keep = big & good
        if not keep.any():
            if good.any():
                side = float(det.sizes()[good].max())
                return FaceResult(
                    "too_small",
                    f"largest face {side:.0f} px < --min-size {self.options.min_size:g}",
                    len(det),
                    photo_size=shape,
                )
            best = float(det.scores.max())
            return FaceResult(
                "low_score",
                f"best score {best:.3f} < --min-score {self.min_score:g}",
                len(det),
                photo_size=shape,
            )
        cand = det.take(np.flatnonzero(keep))
        i = choose_face(cand, shape, self.options.policy)
        if i is None:
            return FaceResult(
                "several_faces",
                f"{len(cand)} faces (policy {self.options.policy})",
                len(det),
                photo_size=shape,
            )
        size = self.options.image_size
        crop = align_face(bgr, cand.landmarks[i], (size, size))
        return FaceResult(
            None,
            "",
            len(det),
            float(cand.scores[i]),
            cand.boxes[i].copy(),
            cand.landmarks[i].copy(),
            crop,
            shape,
        )

    def find_bytes(self, data: bytes, where: str = "photo") -> FaceResult:
        """:meth:`find` on an encoded photo; undecodable bytes give ``unreadable``, an
        image over ``max_pixels`` gives ``too_large`` (not decoded)."""
        try:
            bgr = decode_photo(data, where, self.options.max_pixels)
        except PhotoError as exc:
            return FaceResult(exc.reason, exc.detail)
        return self.find(bgr)

    def find_file(self, path: str | os.PathLike[str]) -> FaceResult:
        """:meth:`find` on a photo file: only a regular file is read (``not_a_file``
        otherwise), up to the byte cap (``too_large``); one that cannot be read gives
        ``unreadable``."""
        try:
            data = read_photo_bytes(path, max_bytes_for(self.options.max_pixels))
        except PhotoError as exc:
            return FaceResult(exc.reason, exc.detail)
        return self.find_bytes(data, os.fsdecode(path))
