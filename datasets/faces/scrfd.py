"""insightface's anchor-free ONNX detectors: SCRFD (``det_10g.onnx``, ``det_500m.onnx``,
``scrfd_*_kps.onnx``) and the RetinaFace exports of its model packs, which share the
output layout.

Facts of the format (insightface's model packs and their documentation):

* one input, float32 NCHW RGB, ``(x - 127.5) / 128``; its size is fixed in some files
  and free in others (then 640x640 is used). The photo is resized, keeping its aspect
  ratio, into the top-left corner of a black canvas of that size.
* per feature stride ``s`` (8, 16, 32; five strides 8..128 in some files) three outputs:
  a face score (already a probability) ``(K_s, 1)``, box distances ``(K_s, 4)`` and
  landmark offsets ``(K_s, 10)`` (files without landmarks have no third kind and are
  refused: alignment needs the 5 points). ``K_s = (H/s) * (W/s) * A`` rows, ``A``
  anchors (2 for 3 strides, 1 for 5) per grid position, position-major (row by row, the
  ``A`` anchors of a position next to each other); a leading batch axis of 1 may be
  present.
* the anchor centre of grid position ``(i, j)`` is ``(j * s, i * s)`` in input pixels;
  box = ``(cx - d0 s, cy - d1 s, cx + d2 s, cy + d3 s)``; landmark ``k`` =
  ``(cx + o_2k s, cy + o_2k+1 s)``.
* detections above the score threshold (0.5) go through non-maximum suppression at
  IoU 0.4.

Outputs are told apart by their last axis (1 / 4 / 10) and their stride by their row
count, so the order of the outputs in the file does not matter.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from datasets.faces.detection import Detections, nms

DEFAULT_INPUT = (640, 640)
#: Largest input side accepted (the canvas is allocated per photo: 4096x4096 is 200 MB
#: of float32); insightface's files use 640.
MAX_INPUT_SIDE = 4096


class SCRFD:
    """An insightface SCRFD / RetinaFace ``.onnx`` detector with 5 landmarks.

    Args:
        path: the ``.onnx`` file.
        input_size: ``(height, width)`` of the network input when the file leaves it free
            (default 640x640); must match the file when it fixes it.
        score_threshold: face probability below which detections are dropped.
        nms_threshold: IoU of non-maximum suppression.
        threads: onnxruntime intra-op threads (1: one core, deterministic).
    """

    default_min_score = 0.5

    def __init__(
        self,
        path: str | os.PathLike[str],
        input_size: tuple[int, int] | None = None,
        score_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        threads: int = 1,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such detector file")
        self.name = f"scrfd:{self.path.name}"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(
                str(self.path), opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ValueError(f"{self.path}: not a loadable ONNX model: {exc}") from exc
        inputs = self._session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ValueError(f"{self.path}: expected one NCHW image input")
        self._input = inputs[0].name
        fixed = inputs[0].shape[2:]
        if all(isinstance(v, int) and v > 0 for v in fixed):
            if input_size is not None and tuple(input_size) != tuple(fixed):
                raise ValueError(
                    f"{self.path}: detector input is fixed at {fixed[0]}x{fixed[1]}, got "
                    f"{input_size[0]}x{input_size[1]}"
                )
            self.input_size = (int(fixed[0]), int(fixed[1]))
        else:
            size = tuple(input_size) if input_size is not None else DEFAULT_INPUT
            self.input_size = (int(size[0]), int(size[1]))
        if any(v % 32 or v <= 0 for v in self.input_size):
            raise ValueError(
                f"{self.path}: detector input size must be positive multiples of 32, got "
                f"{self.input_size[0]}x{self.input_size[1]}"
            )
        if max(self.input_size) > MAX_INPUT_SIDE:
            raise ValueError(
                f"{self.path}: detector input size {self.input_size[0]}x"
                f"{self.input_size[1]} is over the {MAX_INPUT_SIDE}-pixel cap per side "
                "(insightface's detectors use 640x640)"
            )
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self._outputs = [o.name for o in self._session.get_outputs()]
        widths = [o.shape[-1] for o in self._session.get_outputs()]
        if 10 not in widths:
            raise ValueError(
                f"{self.path}: no landmark outputs (last axis 10) among {widths}: "
                "a detector with 5 landmarks is needed for alignment"
            )
        if sorted(set(widths)) != [1, 4, 10] or len(widths) not in (9, 15):
            raise ValueError(
                f"{self.path}: expected 3 or 5 strides of score/box/landmark outputs "
                f"(last axes 1, 4, 10), got {widths}"
            )

    def _levels(
        self, outs: list[np.ndarray]
    ) -> list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
        """Group the outputs into ``(stride, anchors, scores, boxes, kps)`` per level."""
        h, w = self.input_size
        by_width: dict[int, list[np.ndarray]] = {1: [], 4: [], 10: []}
        for o in outs:
            a = np.asarray(o, dtype=np.float64)
            if a.ndim == 3:
                a = a[0]
            by_width[a.shape[-1]].append(a)
        n_levels = len(by_width[1])
        strides = [8 * 2**i for i in range(n_levels)]
        levels = []
        for kind in (1, 4, 10):  # finest level first: the most rows
            by_width[kind].sort(key=lambda a: -a.shape[0])
        for i, s in enumerate(strides):
            cells = (h // s) * (w // s)
            rows = by_width[1][i].shape[0]
            if rows % cells or any(by_width[k][i].shape[0] != rows for k in (4, 10)):
                raise ValueError(
                    f"{self.path}: stride {s} outputs have {rows} rows, not a multiple of "
                    f"the {h // s}x{w // s} grid"
                )
            levels.append((s, rows // cells, by_width[1][i], by_width[4][i], by_width[10][i]))
        return levels

    def detect(self, rgb: np.ndarray, min_face_size: float | None = None) -> Detections:
        """Faces in an RGB uint8 ``(H, W, 3)`` image, best score first.

        ``min_face_size`` is accepted for the :class:`FaceDetector` protocol and ignored:
        the network looks at every scale its input resolves in one pass.
        """
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {rgb.dtype}{rgb.shape}")
        ih, iw = self.input_size
        h, w = rgb.shape[:2]
        scale = min(ih / h, iw / w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        canvas = np.zeros((ih, iw, 3), np.float32)
        canvas[:nh, :nw] = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)
        x = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outs = self._session.run(self._outputs, {self._input: np.ascontiguousarray(x)})
        boxes, scores, kps = [], [], []
        for s, anchors, sc, bb, kp in self._levels(outs):
            gy, gx = np.mgrid[: ih // s, : iw // s]
            centres = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float64) * s
            centres = np.repeat(centres, anchors, axis=0)  # anchors of a position adjacent
            keep = sc[:, 0] >= self.score_threshold
            c, d, o = centres[keep], bb[keep] * s, kp[keep] * s
            boxes.append(np.concatenate([c - d[:, 0:2], c + d[:, 2:4]], axis=1))
            kps.append(c[:, None, :] + o.reshape(-1, 5, 2))
            scores.append(sc[keep, 0])
        b, sc, k = np.concatenate(boxes), np.concatenate(scores), np.concatenate(kps)
        keep = nms(b, sc, self.nms_threshold)
        # input pixels -> photo pixels; the canvas's pixel grid is the resized photo's
        det = Detections(b[keep], sc[keep], k[keep])
        return det.scaled(w / nw, h / nh) if len(det) else Detections.empty()
