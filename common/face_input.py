"""The face crop a recognition model reads: its side, pixel normalisation and colour order.

Every backbone here takes arcface_torch's input (:data:`ARCFACE_INPUT`): 112x112 crops
aligned to the ArcFace 5-point template, RGB, pixels ``p`` in 0..255 fed as
``(p - 127.5) / 127.5``, in [-1, 1]. The data loaders write it, the backbone registry
gives it to each model (``backbones.registry.input_spec``), ONNX export records it and
ONNX inference reads it back. This module is the one place that states it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class InputSpec:
    """A model's input: ``(B, 3, size, size)`` float images, channels in ``color`` order,
    each pixel ``p`` (0..255) as ``(p - mean) / std``."""

    size: int
    mean: float
    std: float
    color: Literal["RGB", "BGR"] = "RGB"

    @property
    def scale(self) -> float:
        """``1 / std``: ``normalized = pixel * scale - offset``."""
        return 1.0 / self.std

    @property
    def offset(self) -> float:
        """``mean / std``."""
        return self.mean / self.std


#: arcface_torch's input, read by every backbone of this project.
ARCFACE_INPUT = InputSpec(size=112, mean=127.5, std=127.5, color="RGB")
