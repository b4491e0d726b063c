"""Mixed precision policy: autocast for the backbone on CUDA, the head always fp32."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class AmpPolicy:
    """Autocast dtype and grad scaler for one device.

    ``mode`` is ``bf16``, ``fp16`` or ``none``; on a non-CUDA device it is always
    ``none`` (CPU autocast is slower than fp32 for these models). ``fp16`` enables a
    :class:`torch.amp.GradScaler`; bf16 has fp32's range and needs none.
    """

    def __init__(self, mode: str, device: torch.device, scaler_only: bool = False) -> None:
        """``scaler_only=True`` runs the fp16 loss-scaling logic without autocast, on any
        device (used by the tests to exercise overflow handling on CPU)."""
        self.device = device
        self.mode = mode if device.type == "cuda" else "none"
        if self.mode == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError("train.amp=bf16 but this GPU has no bf16 support; use train.amp=fp16")
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mode)
        if scaler_only:
            self.mode, self.dtype = "fp16", None
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.mode == "fp16")

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Context for the backbone's forward pass."""
        if self.dtype is None:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.dtype):
            yield

    @property
    def scaling(self) -> bool:
        """True when gradients are loss-scaled (fp16)."""
        return self.scaler.is_enabled()
