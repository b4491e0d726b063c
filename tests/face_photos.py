"""Real-face test photos built from scikit-image's bundled sample images.

No face data set ships with the project; scikit-image's wheel bundles a few photos
(``astronaut``: Eileen Collins, frontal; ``camera``: a man behind a camera, near
profile; ``coffee``, ``chelsea`` (a cat), ``rocket``: no human face). Only these bundled
images are used (others are downloaded on demand, which tests must not do).

Photos are made by warping a source image with a known similarity transform into a
larger canvas. The **truth** for a warped photo is the detector's 5 landmarks on the
untouched source image, mapped through the same transform.
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np


def source(name: str) -> np.ndarray:
    """A bundled scikit-image sample as BGR uint8 ``(H, W, 3)``."""
    from skimage import data

    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(cv2.cvtColor(img[..., :3], cv2.COLOR_RGB2BGR))


def similarity(scale: float, angle_deg: float, tx: float = 0.0, ty: float = 0.0) -> np.ndarray:
    """``(2, 3)`` matrix of ``x -> scale * R(angle) x + t`` (counter-clockwise on screen
    for negative angles, as y points down)."""
    t = np.deg2rad(angle_deg)
    c, s = scale * np.cos(t), scale * np.sin(t)
    return np.array([[c, -s, tx], [s, c, ty]])


def apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Points ``(N, 2)`` through the affine ``m``."""
    return np.asarray(pts, np.float64) @ m[:, :2].T + m[:, 2]


def background(size: tuple[int, int], seed: int) -> np.ndarray:
    """A smooth random BGR background ``(H, W, 3)`` (no face-like structure)."""
    h, w = size
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)


def place(
    canvas: np.ndarray,
    img: np.ndarray,
    landmarks: np.ndarray,
    scale: float,
    angle: float,
    centre: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Warp ``img`` into ``canvas`` (in place) so that the centre of its ``landmarks``
    lands at ``centre``; returns ``(matrix, landmarks in the canvas)``."""
    m = similarity(scale, angle)
    m[:, 2] = np.asarray(centre, np.float64) - m[:, :2] @ np.asarray(landmarks).mean(0)
    h, w = canvas.shape[:2]
    cv2.warpAffine(img, m, (w, h), dst=canvas, borderMode=cv2.BORDER_TRANSPARENT)
    return m, apply(m, landmarks)


def noise_photo(size: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


def write_exif_jpeg(path: Path, displayed_bgr: np.ndarray, orientation: int) -> None:
    """Store ``displayed_bgr`` as a JPEG whose pixels are turned so that a viewer honouring
    the EXIF ``orientation`` shows ``displayed_bgr`` (PIL writes the tag)."""
    from PIL import Image

    stored = {
        1: lambda a: a,
        3: lambda a: a[::-1, ::-1],
        6: lambda a: np.rot90(a, 1),  # displayed = stored turned 90 deg clockwise
        8: lambda a: np.rot90(a, -1),
    }[orientation](displayed_bgr)
    img = Image.fromarray(np.ascontiguousarray(stored[..., ::-1]))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    path.write_bytes(buf.getvalue())


def write_photo(path: Path, bgr: np.ndarray) -> None:
    """By suffix: JPEG (q95), PNG or WebP (lossy, q90)."""
    params = {".jpg": [cv2.IMWRITE_JPEG_QUALITY, 95], ".webp": [cv2.IMWRITE_WEBP_QUALITY, 90]}
    ok, buf = cv2.imencode(path.suffix, bgr, params.get(path.suffix, []))
    assert ok, path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.tobytes())
