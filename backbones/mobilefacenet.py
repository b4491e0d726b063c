"""MobileFaceNet: a depthwise-separable face backbone with a GDC head.

Layout for a channel scale ``s`` (``mbf``: s=2, blocks (1, 4, 6, 2);
``mbf_large``: s=4, blocks (2, 8, 12, 4)) at 112x112 input:

========================  ============  =====================  ========
unit                      output        expansion width        stride
========================  ============  =====================  ========
conv3x3 + BN + PReLU      64s x 56x56   -                      2
stage 0: blocks[0] units  64s x 56x56   depthwise, or 128      1
down 1 + blocks[1] res.   64s x 28x28   128                    2
down 2 + blocks[2] res.   128s x 14x14  256                    2
down 3 + blocks[3] res.   128s x 7x7    512 (down), 256 (res)  2
conv1x1 + BN + PReLU      512 x 7x7     -                      1
GDC: dw7x7 + BN, FC, BN1d E                                    -
========================  ============  =====================  ========

A unit is ``conv1x1 (expand) -> BN -> PReLU -> depthwise 3x3 (stride) -> BN ->
PReLU -> conv1x1 (project) -> BN``, with an identity shortcut when the shape
is kept. Stage 0 is a single depthwise 3x3 conv + BN + PReLU when
``blocks[0] == 1`` and ``blocks[0]`` residual units otherwise. ``width_mult``
scales every channel count (including the expansion widths and the 512 of the
GDC), which gives the tiny CPU demo model (``mbf_tiny``: ``width_mult=0.25``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from backbones.checkpointing import run_blocks
from backbones.precision import run_fp32


def _round8(c: float) -> int:
    """Round a channel count to a multiple of 8 (at least 8)."""
    return max(8, int(c + 4) // 8 * 8)


class ConvBN(nn.Sequential):
    """``conv -> BN [-> PReLU]``; ``(B, cin, H, W) -> (B, cout, H', W')``."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        act: bool = True,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act:
            layers.append(nn.PReLU(cout))
        super().__init__(*layers)


class DepthwiseUnit(nn.Module):
    """Expand (1x1) -> depthwise 3x3 (stride) -> linear project (1x1), with an
    identity shortcut when ``stride == 1`` and ``cin == cout``.

    ``(B, cin, H, W) -> (B, cout, H/stride, W/stride)``.
    """

    def __init__(self, cin: int, cout: int, expand: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvBN(cin, expand, 1),
            ConvBN(expand, expand, 3, stride, groups=expand),
            ConvBN(expand, cout, 1, act=False),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out + x if self.residual else out


class MobileFaceNet(nn.Module):
    """MobileFaceNet backbone.

    Maps ``(B, 3, 112, 112)`` images in [-1, 1] to ``(B, embedding_size)``
    embeddings (not L2-normalised).

    Args:
        embedding_size: output dimension.
        blocks: units in stage 0 and residual units in stages 1-3.
        scale: channel scale ``s`` of the layout table (2 for ``mbf``).
        width_mult: extra multiplier on every channel count (rounded to a
            multiple of 8); 0.25 gives a model small enough to train on CPU.
        checkpoint: checkpoint the activations of every unit in training.
        input_size: side of the square input; must be divisible by 16.
    """

    def __init__(
        self,
        embedding_size: int = 512,
        blocks: Sequence[int] = (1, 4, 6, 2),
        scale: int = 2,
        width_mult: float = 1.0,
        checkpoint: bool = False,
        input_size: int = 112,
    ) -> None:
        super().__init__()
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"blocks must be 4 positive counts, got {list(blocks)}")
        if input_size % 16:
            raise ValueError(f"input_size must be divisible by 16, got {input_size}")
        self.checkpoint = checkpoint
        self.embedding_size = embedding_size

        def ch(c: float) -> int:
            return _round8(c * width_mult)

        c1, c2 = ch(64 * scale), ch(128 * scale)
        self.stem = ConvBN(3, c1, 3, stride=2)
        units: list[nn.Module] = []
        if blocks[0] == 1:
            units.append(ConvBN(c1, c1, 3, groups=c1))
        else:
            units += [DepthwiseUnit(c1, c1, ch(128)) for _ in range(blocks[0])]
        # (output channels, expansion of the downsampling unit, expansion of
        #  the residual units, number of residual units)
        stages = (
            (c1, ch(128), ch(128), blocks[1]),
            (c2, ch(256), ch(256), blocks[2]),
            (c2, ch(512), ch(256), blocks[3]),
        )
        cin = c1
        for cout, down_expand, res_expand, n in stages:
            units.append(DepthwiseUnit(cin, cout, down_expand, stride=2))
            units += [DepthwiseUnit(cout, cout, res_expand) for _ in range(n)]
            cin = cout
        c_sep = ch(512)
        units.append(ConvBN(cin, c_sep, 1))
        self.units = nn.Sequential(*units)
        side = input_size // 16
        self.gdc = ConvBN(c_sep, c_sep, side, groups=c_sep, act=False)
        self.gdc[0].padding = (0, 0)  # global depthwise conv: 7x7 -> 1x1
        self.head = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(c_sep, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, embedding_size)`` float32."""
        x = self.stem(x)
        x = run_blocks(self.units, x, self.checkpoint and self.training)
        x = self.gdc(x)
        return run_fp32(self.head, x)
