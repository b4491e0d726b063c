"""Image decoding and the training transform, with OpenCV only (no torchvision).

The pipeline per image is: decode JPEG/PNG with OpenCV (BGR, its fastest path) → resize to
112×112 if needed → optional horizontal flip → RGB float32 in ``[-1, 1]`` as
``(pixel - 127.5) / 127.5``: the backbones' input, :data:`common.face_input.ARCFACE_INPUT`.

Two output forms:

* :func:`to_float_chw` gives the Dataset contract, a float32 tensor of shape ``(3, 112, 112)``
  (a channels-last view of an HWC buffer; ``torch.stack`` in collation makes it NCHW).
* :func:`to_uint8_hwc` keeps BGR uint8 ``(112, 112, 3)``; the loader ships these between
  processes (4× less memory traffic) and converts whole batches to RGB float with
  :func:`normalize_batch`, on the training device.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from common.face_input import ARCFACE_INPUT
from datasets.errors import DataError

IMAGE_SIZE = ARCFACE_INPUT.size


class ImageDecodeError(DataError):
    """An image payload OpenCV cannot decode."""


def decode_bgr(buf: bytes | memoryview | np.ndarray, where: str | None = "image") -> np.ndarray:
    """Decode an encoded image to BGR uint8 ``(H, W, 3)`` (OpenCV's fastest colour path).

    Raises :class:`ImageDecodeError` naming ``where``; with ``where=None`` returns ``None``
    for an undecodable image instead (the Dataset builds its message only then).
    """
    arr = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, np.uint8)
    try:
        img = cv2.imdecode(arr, cv2.IMREAD_COLOR) if arr.size else None
    except cv2.error:  # e.g. a header announcing more pixels than OpenCV allows
        img = None
    if img is None:
        if where is None:
            return None
        raise ImageDecodeError(f"{where}: OpenCV cannot decode {arr.size} bytes as an image")
    return img


def decode_rgb(buf: bytes | memoryview | np.ndarray, where: str = "image") -> np.ndarray:
    """Decode an encoded image to RGB uint8 ``(H, W, 3)``; raises :class:`ImageDecodeError`."""
    return cv2.cvtColor(decode_bgr(buf, where), cv2.COLOR_BGR2RGB)


def _fit(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[0] != size or img.shape[1] != size:
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return img


def to_float_chw(img: np.ndarray, flip: bool, size: int = IMAGE_SIZE) -> torch.Tensor:
    """BGR uint8 ``(H, W, 3)`` (as decoded) → RGB float32 tensor ``(3, size, size)`` in [-1, 1].

    ``flip`` mirrors left-right. The result is a channels-last view (strides ``(1, 3W, 3)``).
    """
    img = cv2.cvtColor(_fit(img, size), cv2.COLOR_BGR2RGB)
    if flip:
        cv2.flip(img, 1, dst=img)
    out = cv2.addWeighted(
        img, ARCFACE_INPUT.scale, img, 0.0, -ARCFACE_INPUT.offset, dtype=cv2.CV_32F
    )
    return torch.from_numpy(out.transpose(2, 0, 1))


def to_uint8_hwc(img: np.ndarray, flip: bool, size: int = IMAGE_SIZE) -> torch.Tensor:
    """BGR uint8 ``(H, W, 3)`` → BGR uint8 tensor ``(size, size, 3)``, flipped if asked.

    The channel order is left as decoded; :func:`normalize_batch` turns it into RGB.
    """
    img = _fit(img, size)
    if flip:
        img = cv2.flip(img, 1)
    return torch.from_numpy(img)


def normalize_batch(batch: torch.Tensor) -> torch.Tensor:
    """BGR uint8 ``(N, H, W, 3)`` → contiguous RGB float32 ``(N, 3, H, W)`` in ``[-1, 1]``.

    Works on any device; run it after moving the uint8 batch to the GPU.
    """
    x = batch.flip(3).permute(0, 3, 1, 2)
    x = x.to(torch.float32, memory_format=torch.contiguous_format)
    return x.mul_(ARCFACE_INPUT.scale).sub_(ARCFACE_INPUT.offset)


def flip_from_seed(aug_seed: int) -> bool:
    """The flip decision for a sample, from the per-sample seed the sampler hands out."""
    # splitmix64 finaliser: a well mixed bit from consecutive seeds
    z = (aug_seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return bool((z ^ (z >> 31)) & 1)
