"""IResNet: ResNet with improved residual units for 112x112 face images.

Each unit is ``BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN`` added
to a shortcut (identity, or ``conv1x1(stride) -> BN`` when the shape
changes), with no activation after the addition. The stem is
``conv3x3(64) -> BN -> PReLU`` at full resolution; four stages of widths
64/128/256/512 each halve the resolution (112 -> 56 -> 28 -> 14 -> 7). The
embedding head is ``BN2d -> dropout -> flatten -> FC(512*7*7 -> E) -> BN1d``
with the final BN1d scale fixed to 1 (only its shift is learned).

Module and parameter names are arcface_torch's (``conv1``, ``layer3.5.bn2``,
``fc``, ``features``, ...), so its weights load with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from backbones.checkpointing import run_blocks
from backbones.precision import run_fp32
from common.face_input import ARCFACE_INPUT

#: Units per stage for each depth.
IRESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}

_WIDTHS = (64, 128, 256, 512)
_BN_EPS = 1e-5


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Improved residual unit mapping ``(B, cin, H, W)`` to
    ``(B, cout, H/stride, W/stride)``."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=_BN_EPS)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                nn.BatchNorm2d(cout, eps=_BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """IResNet backbone, with arcface_torch's module names (so its ``backbone.pth``
    files load with ``strict=True``, and ours load into its code).

    Maps ``(B, 3, 112, 112)`` images in [-1, 1] to ``(B, embedding_size)``
    embeddings (not L2-normalised).

    Modules: ``conv1``, ``bn1``, ``prelu`` (stem); ``layer1`` .. ``layer4``
    (:class:`IBasicBlock` units ``bn1, conv1, bn2, prelu, conv2, bn3`` and, on the
    first unit of each stage, ``downsample.0`` conv1x1 / ``downsample.1`` BN);
    ``bn2``, ``dropout``, ``fc``, ``features`` (the embedding head).

    Args:
        layers: number of units in each of the four stages.
        embedding_size: output dimension.
        dropout: dropout probability before the FC layer.
        checkpoint: checkpoint the activations of every residual unit in
            training (less memory, one extra forward of the trunk).
        input_size: side of the square input; must be divisible by 16.
    """

    def __init__(
        self,
        layers: Sequence[int],
        embedding_size: int = 512,
        dropout: float = 0.0,
        checkpoint: bool = False,
        input_size: int = ARCFACE_INPUT.size,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"IResNet needs 4 stage depths, got {list(layers)}")
        if input_size % 16:
            raise ValueError(f"input_size must be divisible by 16, got {input_size}")
        self.checkpoint = checkpoint
        self.embedding_size = embedding_size
        self.conv1 = _conv3x3(3, _WIDTHS[0])
        self.bn1 = nn.BatchNorm2d(_WIDTHS[0], eps=_BN_EPS)
        self.prelu = nn.PReLU(_WIDTHS[0])
        cin = _WIDTHS[0]
        for stage, (depth, width) in enumerate(zip(layers, _WIDTHS, strict=True), start=1):
            units = []
            for i in range(depth):
                units.append(IBasicBlock(cin, width, stride=2 if i == 0 else 1))
                cin = width
            self.add_module(f"layer{stage}", nn.Sequential(*units))
        side = input_size // 16
        self.bn2 = nn.BatchNorm2d(cin, eps=_BN_EPS)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin * side * side, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=_BN_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.features.weight.requires_grad_(False)  # fixed unit scale on the embedding

    def units(self) -> Iterator[nn.Module]:
        """The residual units in forward order (``layer1.0`` ... ``layer4.N``)."""
        for stage in range(1, 5):
            yield from getattr(self, f"layer{stage}")

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 512, H/16, W/16)`` -> ``(B, embedding_size)``."""
        return self.features(self.fc(torch.flatten(self.dropout(self.bn2(x)), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, embedding_size)`` float32."""
        x = self.prelu(self.bn1(self.conv1(x)))
        x = run_blocks(self.units(), x, self.checkpoint and self.training)
        return run_fp32(self._head, x)


def iresnet(depth: int, **kwargs: object) -> IResNet:
    """Build IResNet-``depth`` (18, 34, 50, 100 or 200); ``kwargs`` go to
    :class:`IResNet`."""
    if depth not in IRESNET_LAYERS:
        raise ValueError(f"no IResNet-{depth}; depths: {sorted(IRESNET_LAYERS)}")
    return IResNet(IRESNET_LAYERS[depth], **kwargs)  # type: ignore[arg-type]
