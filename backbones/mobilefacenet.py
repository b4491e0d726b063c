"""MobileFaceNet: a depthwise-separable face backbone with a GDC head.

Layout for a channel scale ``s`` (``mbf``: s=2, blocks (1, 4, 6, 2);
``mbf_large``: s=4, blocks (2, 8, 12, 4)) at 112x112 input, with arcface_torch's
module names:

===========  ==========================  ============  ===============  ======
module       unit                        output        expansion width  stride
===========  ==========================  ============  ===============  ======
layers.0     conv3x3 + BN + PReLU        64s x 56x56   -                2
layers.1     stage 0 (see below)         64s x 56x56   grouped, or 128  1
layers.2     down 1                      64s x 28x28   128              2
layers.3     blocks[1] residual units    64s x 28x28   128              1
layers.4     down 2                      128s x 14x14  256              2
layers.5     blocks[2] residual units    128s x 14x14  256              1
layers.6     down 3                      128s x 7x7    512              2
layers.7     blocks[3] residual units    128s x 7x7    256              1
conv_sep     conv1x1 + BN + PReLU        512 x 7x7     -                1
features     GDC: dw7x7 + BN, FC, BN1d   E             -                -
===========  ==========================  ============  ===============  ======

A unit (:class:`DepthWise`, ``layers.{0,1,2}``) is ``conv1x1 (expand) -> BN ->
PReLU -> depthwise 3x3 (stride) -> BN -> PReLU -> conv1x1 (project) -> BN``, with
an identity shortcut in the residual units (:class:`Residual` holds them as
``layers.N``). Every conv/BN(/PReLU) triple is a :class:`ConvBlock` whose
``layers.0/1/2`` are the conv, the BN and the PReLU.

Stage 0 is ``blocks[0]`` residual units when ``blocks[0] > 1``; otherwise a
single 3x3 conv + BN + PReLU, grouped as in insightface (``groups=64`` at
``mbf``'s 128 channels: two input channels per group, weight ``(128, 2, 3, 3)``)
or, with ``depthwise_stage0=True``, fully depthwise (``groups=128``, weight
``(128, 1, 3, 3)``, as in the MobileFaceNet paper). ``width_mult`` scales every
channel count (including the expansion widths, the stage-0 group count and the 512
of the GDC), which gives the tiny CPU demo model (``mbf_tiny``: ``width_mult=0.25``,
depthwise stage 0).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from backbones.checkpointing import run_blocks
from backbones.precision import run_fp32
from common.face_input import ARCFACE_INPUT


def _round8(c: float) -> int:
    """Round a channel count to a multiple of 8 (at least 8)."""
    return max(8, int(c + 4) // 8 * 8)


class ConvBlock(nn.Module):
    """``conv -> BN [-> PReLU]`` as ``layers.0/1[/2]`` (arcface_torch's ``ConvBlock``,
    or its ``LinearBlock`` when ``act=False``); ``(B, cin, H, W) -> (B, cout, H', W')``."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        act: bool = True,
        padding: int | None = None,
    ) -> None:
        super().__init__()
        pad = kernel // 2 if padding is None else padding
        modules: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, pad, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act:
            modules.append(nn.PReLU(cout))
        self.layers = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """Expand (1x1) -> depthwise 3x3 (stride) -> linear project (1x1), plus the input
    when ``residual``; ``(B, cin, H, W) -> (B, cout, H/stride, W/stride)``."""

    def __init__(
        self, cin: int, cout: int, expand: int, stride: int = 1, residual: bool = False
    ) -> None:
        super().__init__()
        if residual and (stride != 1 or cin != cout):
            raise ValueError("a residual unit keeps the shape (stride 1, cin == cout)")
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(cin, expand, 1),
            ConvBlock(expand, expand, 3, stride, groups=expand),
            ConvBlock(expand, cout, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return out + x if self.residual else out


class Residual(nn.Module):
    """``n`` shape-keeping :class:`DepthWise` units as ``layers.0 .. layers.{n-1}``."""

    def __init__(self, c: int, n: int, expand: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(DepthWise(c, c, expand, residual=True) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv head: ``layers.0`` dw ``side x side`` conv + BN,
    ``layers.1`` flatten, ``layers.2`` FC (no bias), ``layers.3`` BN1d;
    ``(B, c, side, side) -> (B, embedding_size)``."""

    def __init__(self, c: int, side: int, embedding_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            ConvBlock(c, c, side, groups=c, act=False, padding=0),
            nn.Flatten(1),
            nn.Linear(c, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet backbone, with arcface_torch's module names (see the module
    docstring for the layout).

    Maps ``(B, 3, 112, 112)`` images in [-1, 1] to ``(B, embedding_size)``
    embeddings (not L2-normalised).

    Args:
        embedding_size: output dimension.
        blocks: units in stage 0 and residual units in stages 1-3.
        scale: channel scale ``s`` of the layout table (2 for ``mbf``).
        width_mult: extra multiplier on every channel count (rounded to a
            multiple of 8); 0.25 gives a model small enough to train on CPU.
        depthwise_stage0: with ``blocks[0] == 1``, make the stage-0 conv fully
            depthwise instead of insightface's grouping (64 groups at width 1).
        checkpoint: checkpoint the activations of every unit in training.
        input_size: side of the square input; must be divisible by 16.
    """

    def __init__(
        self,
        embedding_size: int = 512,
        blocks: Sequence[int] = (1, 4, 6, 2),
        scale: int = 2,
        width_mult: float = 1.0,
        depthwise_stage0: bool = False,
        checkpoint: bool = False,
        input_size: int = ARCFACE_INPUT.size,
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
        if blocks[0] == 1:
            groups = c1 if depthwise_stage0 else ch(64)
            if c1 % groups:
                raise ValueError(f"stage 0: {c1} channels do not split into {groups} groups")
            stage0: nn.Module = ConvBlock(c1, c1, 3, groups=groups)
        else:
            stage0 = Residual(c1, blocks[0], ch(128))
        self.layers = nn.ModuleList(
            [
                ConvBlock(3, c1, 3, stride=2),
                stage0,
                DepthWise(c1, c1, ch(128), stride=2),
                Residual(c1, blocks[1], ch(128)),
                DepthWise(c1, c2, ch(256), stride=2),
                Residual(c2, blocks[2], ch(256)),
                DepthWise(c2, c2, ch(512), stride=2),
                Residual(c2, blocks[3], ch(256)),
            ]
        )
        c_sep = ch(512)
        self.conv_sep = ConvBlock(c2, c_sep, 1)
        self.features = GDC(c_sep, input_size // 16, embedding_size)
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

    def units(self) -> Iterator[nn.Module]:
        """What activation checkpointing recomputes one at a time, in forward order:
        stage 0 (or its units), every unit of stages 1-3, ``conv_sep``."""
        for layer in list(self.layers)[1:]:
            yield from layer.layers if isinstance(layer, Residual) else (layer,)
        yield self.conv_sep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, embedding_size)`` float32."""
        x = self.layers[0](x)
        x = run_blocks(self.units(), x, self.checkpoint and self.training)
        return run_fp32(self.features, x)
