"""Five-point face alignment onto the standard 112x112 ArcFace template.

The one home of the alignment: the face finder (:mod:`datasets.faces.finder`, for
``datasets.prepare``, ``eval.compare`` and ``eval.embed``) and IJB evaluation
(:mod:`eval.ijb_data`) use it.
"""

from __future__ import annotations

import cv2
import numpy as np

from common.face_input import ARCFACE_INPUT

#: Side of the square frame :data:`ARCFACE_TEMPLATE` is given in (a fact of the template).
TEMPLATE_FRAME = 112.0
#: Left eye, right eye, nose tip, left and right mouth corners, in 112x112 pixels.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, translation) ``src -> dst``.

    Closed form of Umeyama (1991) with a proper rotation (no reflection).

    Args:
        src: ``(N, 2)`` points, N >= 2.
        dst: ``(N, 2)`` corresponding points.
    Returns:
        ``(2, 3)`` float64 matrix ``M`` with ``dst ~ M @ [x, y, 1]``.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"need matching (N>=2, 2) point sets, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    var_s = float((sc**2).sum() / len(src))
    if var_s == 0:
        raise ValueError("source points are all identical")
    cov = dc.T @ sc / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = float((s * d).sum() / var_s)
    m = np.empty((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def align_face(
    image: np.ndarray,
    landmarks: np.ndarray,
    size: tuple[int, int] = (ARCFACE_INPUT.size, ARCFACE_INPUT.size),
) -> np.ndarray:
    """Warp ``image`` so that its 5 ``landmarks`` land on :data:`ARCFACE_TEMPLATE`.

    Args:
        image: ``(H, W, C)`` uint8 image (any channel order; it is kept).
        landmarks: ``(5, 2)`` or ``(10,)`` pixel coordinates ``x, y``.
        size: ``(H, W)`` of the output; the template is scaled if not 112x112.
    Returns:
        ``(size[0], size[1], C)`` aligned crop (bilinear, black border).
    """
    pts = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    template = ARCFACE_TEMPLATE * np.array([size[1] / TEMPLATE_FRAME, size[0] / TEMPLATE_FRAME])
    m = similarity_transform(pts, template)
    return cv2.warpAffine(image, m, (size[1], size[0]), borderValue=0.0)
