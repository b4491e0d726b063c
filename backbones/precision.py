"""Mixed-precision helper: run the embedding layers in float32.

The trunk of every backbone may run under ``torch.autocast``; the final
embedding layers (the FC/BN1d head that produces the face embedding) always run
in float32 so that the embedding and its normalisation statistics are not
quantised to half precision.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def run_fp32(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply ``module`` to ``x`` in float32 with autocast disabled.

    Args:
        module: the layers to run in full precision (a module or a method that
            applies several).
        x: any tensor; it is cast to ``float32`` first.

    Returns:
        ``module(x.float())`` computed outside autocast (a float32 tensor when
        the module's parameters are float32).
    """
    x = x.float()
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return module(x)
    # Outside autocast there is nothing to disable; keeping the autocast
    # context out of the graph keeps tracing and ONNX export simple.
    return module(x)
