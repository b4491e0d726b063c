"""Parameter and multiply-accumulate counts.

MACs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one
forward pass in eval mode: every convolution, linear layer and attention
matmul contributes ``2 * MACs`` FLOPs there, and this module reports
``FLOPs / 2``. Face-recognition papers and model zoos quote exactly this MAC
count as "FLOPs" (IResNet-50: 6.3G). Element-wise work (BN, PReLU, residual
additions, softmax) is not counted.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from common.face_input import ARCFACE_INPUT


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, input_size: int = ARCFACE_INPUT.size) -> int:
    """Multiply-accumulates of one forward pass on a ``(1, 3, s, s)`` input.

    The model is run in eval mode (restored afterwards) without gradients, on
    the device of its parameters.
    """
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        x = torch.zeros(1, 3, input_size, input_size, device=device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


#: Published sizes at 112x112 with a 512-d embedding: (parameters in
#: millions, GMACs quoted as "GFLOPs"); ``None`` where no figure is quoted.
PUBLISHED: dict[str, tuple[float | None, float | None]] = {
    "r18": (24.0, None),
    "r34": (34.1, None),
    "r50": (43.6, 6.3),
    "r100": (65.2, 12.1),
    "r200": (118.8, None),
    "mbf": (2.06, 0.45),
    "mbf_large": (6.3, None),
}
