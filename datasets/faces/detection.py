"""What every face detector returns, non-maximum suppression and the one-face policy.

Coordinates are pixels of the image given to the detector. Landmarks use OpenCV's
convention (what ``cv2.warpAffine`` and :func:`datasets.faces.align.align_face` expect):
pixel ``(i, j)`` has its centre at ``x = j, y = i``. Boxes ``(x1, y1, x2, y2)`` are the corners
of the area they cover, in the same coordinates: pixel ``j`` covers ``[j - 0.5, j + 0.5)``,
so a box around pixels 10..19 has ``x1 = 9.5, x2 = 19.5`` and ``x2 - x1`` is its width in
pixels. The image spans ``[-0.5, W - 0.5]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

#: Face-choice policies for photos with several faces (see :func:`choose_face`).
POLICIES = ("largest", "central", "single")


@dataclass(frozen=True)
class Detections:
    """``K`` detected faces.

    Attributes:
        boxes: float64 ``(K, 4)`` ``x1, y1, x2, y2``.
        scores: float64 ``(K,)`` face probability in ``[0, 1]``.
        landmarks: float64 ``(K, 5, 2)`` ``x, y`` of the left eye, right eye, nose tip,
            left and right mouth corners ("left" = smaller ``x`` in the image), the
            order of :data:`datasets.faces.align.ARCFACE_TEMPLATE`.
    """

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @staticmethod
    def empty() -> Detections:
        return Detections(np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2)))

    def take(self, index: np.ndarray | list[int]) -> Detections:
        """The faces at ``index`` (integer indices or a boolean mask), in that order."""
        return Detections(self.boxes[index], self.scores[index], self.landmarks[index])

    def scaled(self, fx: float, fy: float | None = None) -> Detections:
        """Coordinates multiplied by ``fx`` (x) and ``fy`` (y, default ``fx``): detections
        on a resized copy -> the original.

        With pixel centres at integers, resizing by ``f`` maps ``x`` to
        ``(x + 0.5) * f - 0.5`` (the image's outer edge ``-0.5`` stays put).
        """
        f = np.array([fx, fx if fy is None else fy], dtype=np.float64)
        f4 = np.concatenate([f, f])
        return Detections(
            (self.boxes + 0.5) * f4 - 0.5,
            self.scores.copy(),
            (self.landmarks + 0.5) * f - 0.5,
        )

    def sizes(self) -> np.ndarray:
        """Shorter side of each box, ``(K,)`` pixels."""
        wh = self.boxes[:, 2:4] - self.boxes[:, 0:2]
        return np.minimum(wh[:, 0], wh[:, 1])


class FaceDetector(Protocol):
    """A face detector: RGB uint8 ``(H, W, 3)`` -> :class:`Detections` (best first)."""

    #: a short name for reports (``"mtcnn"``, ``"scrfd:det_10g.onnx"``)
    name: str
    #: the ``min_score`` a caller should use when it has no opinion
    default_min_score: float

    def detect(self, rgb: np.ndarray, min_face_size: float | None = None) -> Detections:
        """Faces of ``rgb``; ``min_face_size`` (pixels) is a hint: detectors that search
        scale by scale (MTCNN) need not look for smaller faces."""
        ...


def box_iou(box: np.ndarray, boxes: np.ndarray, mode: str = "union") -> np.ndarray:
    """Overlap of one ``(4,)`` box with ``(K, 4)`` boxes: intersection over union, or over
    the smaller area (``mode="min"``, MTCNN's last stage). ``(K,)``."""
    xx1 = np.maximum(box[0], boxes[:, 0])
    yy1 = np.maximum(box[1], boxes[:, 1])
    xx2 = np.minimum(box[2], boxes[:, 2])
    yy2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    den = np.minimum(area, areas) if mode == "min" else area + areas - inter
    return inter / np.maximum(den, 1e-12)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression: indices of the kept boxes, best score first.

    A box is dropped when its overlap (:func:`box_iou`) with a better kept box is above
    ``threshold``. Ties in score keep the earlier box (stable order), so the result
    does not depend on anything but the inputs.
    """
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        if order.size == 1:
            break
        rest = order[1:]
        order = rest[box_iou(boxes[i], boxes[rest], mode) <= threshold]
    return np.asarray(keep, dtype=np.int64)


def choose_face(det: Detections, image_shape: tuple[int, ...], policy: str) -> int | None:
    """Index of the face to keep among ``det`` (non-empty), or ``None`` when the policy
    refuses the photo.

    * ``largest``: the largest box area (ties: the higher score, then the earlier);
    * ``central``: the box centre nearest to the image centre (ties: the larger area);
    * ``single``: the only face, ``None`` if there are several.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if len(det) == 0:
        raise ValueError("choose_face needs at least one detection")
    if len(det) == 1:
        return 0
    if policy == "single":
        return None
    wh = det.boxes[:, 2:4] - det.boxes[:, 0:2]
    area = wh[:, 0] * wh[:, 1]
    if policy == "largest":
        # lexsort: last key is primary; earlier index wins remaining ties (stable)
        return int(np.lexsort((-det.scores, -area))[0])
    h, w = image_shape[:2]
    centre = (det.boxes[:, 0:2] + det.boxes[:, 2:4]) / 2
    dist = np.hypot(centre[:, 0] - w / 2, centre[:, 1] - h / 2)
    return int(np.lexsort((-area, dist))[0])
