"""The aligned Xception family (timm ``xception_aligned``: Xception-41/65/71 and the pre-activation
41p/65p; DeepLabV3+'s backbones).

A stem of two 3x3 conv-norm-ReLUs (the first at stride 2), then blocks of three depthwise-separable
convolutions (a 3x3 depthwise, a 1x1), the last of a strided block at stride 2 with a 1x1 strided
conv-norm as its shortcut. In the original blocks a ReLU runs before each separable convolution
(after each norm in the last block, which has no shortcut); in the pre-activation ones a norm-ReLU
runs before each, the block's first norm also feeding its shortcut, and a ReLU ends the network.
Every operator is one the other families have: no new sparse kernel.

timm's feature taps sit inside the strided blocks (before their last, strided convolution, as
DeepLab taps them); the encoder's stages run whole blocks, so a stage ends with the last block
at its stride, the map the next stage reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from timm.layers import ConvNormAct
from timm.models.xception_aligned import (PreSeparableConv2d, PreXceptionModule, SeparableConv2d, XceptionAligned,
                                          XceptionModule)
from torch import nn

from ..family import Family
from ..layouts import STRIDES, Layout, check_strides
from ..mirrors import Converter, MirrorChildren, MirrorConvNormAct
from ..refusals import CheckpointingRefused


class MirrorSeparableConv2d(MirrorChildren):
    """SeparableConv2d: depthwise conv, norm, activation (an identity where a ReLU runs before the
    convolution), pointwise conv, norm, activation."""

    children_names = ("conv_dw", "bn_dw", "act_dw", "conv_pw", "bn_pw", "act_pw")

    def forward(self, x):
        x = self.act_dw(self.bn_dw(self.conv_dw(x)))
        return self.act_pw(self.bn_pw(self.conv_pw(x)))


class MirrorPreSeparableConv2d(MirrorChildren):
    """PreSeparableConv2d: norm-ReLU (an identity in a block's first), depthwise conv, pointwise conv."""

    children_names = ("norm", "conv_dw", "conv_pw")

    def forward(self, x):
        return self.conv_pw(self.conv_dw(self.norm(x)))


class _MirrorXceptionBlock(MirrorChildren):
    """The residual both block kinds share: the stack's output [after drop path] + the shortcut of
    ``skip`` (the block's input, or its normed input in pre-activation blocks), none in a no-skip block."""

    def __init__(self, block: nn.Module, convert: Converter, path: str):
        super().__init__(block, convert, path)
        self.no_skip = block.no_skip

    def residual(self, x, skip):
        if self.no_skip:
            return x
        if self.shortcut is not None:
            skip = self.shortcut(skip)
        return (x if self.drop_path is None else self.drop_path(x)) + skip


class MirrorXceptionModule(_MirrorXceptionBlock):
    """XceptionModule: three separable convolutions (each after a ReLU, unless it starts without
    one), + a 1x1 conv-norm shortcut where the block strides or widens."""

    children_names = ("stack", "shortcut", "drop_path")

    def forward(self, x):
        return self.residual(self.stack(x), x)


class MirrorPreXceptionModule(_MirrorXceptionBlock):
    """PreXceptionModule: norm-ReLU, then three pre-activation separable convolutions, + the normed
    input (through a 1x1 conv where the block strides or widens)."""

    children_names = ("norm", "stack", "shortcut", "drop_path")

    def forward(self, x):
        x = self.norm(x)
        return self.residual(self.stack(x), x)


@dataclass(frozen=True)
class StridedBlocks:
    """The stem, then the blocks grouped by stride: a stage ends with the last block at its
    stride, the last one with the network's final activation (pre-activation nets' ReLU)."""

    def __call__(self, model: XceptionAligned) -> Layout:
        stride = 2  # the stem's
        ends = {}  # stride -> the last block there
        for i, block in enumerate(model.blocks):
            stride *= block.stack[-1].conv_dw.stride[0]
            ends[stride] = i
        check_strides(model, sorted(ends))
        starts = [0] + [ends[s] + 1 for s in STRIDES[:-1]]
        stages = [tuple(f"blocks.{i}" for i in range(a, ends[s] + 1)) for a, s in zip(starts, STRIDES)]
        stages[-1] += ("act",)
        return Layout(("stem",), tuple(stages), tuple(model.blocks[ends[s]].out_channels for s in STRIDES))


XCEPTION = Family(
    name="xception_aligned",
    timm_class=XceptionAligned,
    mirrors={ConvNormAct: MirrorConvNormAct, SeparableConv2d: MirrorSeparableConv2d,
             PreSeparableConv2d: MirrorPreSeparableConv2d, XceptionModule: MirrorXceptionModule,
             PreXceptionModule: MirrorPreXceptionModule},
    layout=StridedBlocks(),
    check=CheckpointingRefused("blocks"),
    norm_acts={MirrorSeparableConv2d: (("bn_dw", "act_dw"), ("bn_pw", "act_pw"))},
)
