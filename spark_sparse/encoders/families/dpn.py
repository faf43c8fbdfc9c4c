"""The DPN family (timm ``DPN``: Dual Path Networks 48b, 68, 68b, 92, 98, 107, 131).

A dual path block carries two paths in one tensor: its first ``num_1x1_c`` channels are a
residual path (summed with the block's new channels), the rest a dense path (the block's other
new channels join it). Pre-activation units (batch norm + ReLU, then a convolution): a 1x1, a
grouped 3x3 (strided in a stage's first block, whose 1x1 projection of the input strides too),
a 1x1 (or, in the ``b`` variants, a norm and two 1x1s). The body is one Sequential ``features``:
a 7x7 or 3x3 stride-2 conv-norm-act stem, a 3x3 max pooling, the blocks and a final norm + ReLU.
"""

from __future__ import annotations

from timm.layers import ConvNormAct
from timm.models.dpn import DPN, BnAct, BnActConv2d, DualPathBlock
from torch import nn

from ..family import Family
from ..layouts import ChildStages
from ..leaves import ChannelConcat, ChannelSplit
from ..mirrors import Converter, MirrorChildren, MirrorConvNormAct


class MirrorBnActConv2d(nn.Module):
    """timm's BnActConv2d: its batch norm with its activation, then its convolution."""

    def __init__(self, module: BnActConv2d, convert: Converter, path: str):
        super().__init__()
        self.bn = convert.leaf(module.bn, f"{path}.bn")
        self.conv = convert.leaf(module.conv, f"{path}.conv")

    def forward(self, x):
        return self.conv(self.bn(x))


class MirrorBnAct(nn.Module):
    """timm's BnAct: its batch norm with its activation, under timm's name ``bn``."""

    def __init__(self, module: BnAct, convert: Converter, path: str):
        super().__init__()
        self.bn = convert.leaf(module.bn, f"{path}.bn")

    def forward(self, x):
        return self.bn(x)


class MirrorDualPathBlock(MirrorChildren):
    """timm's DualPathBlock: [the input's projection], c1x1_a, c3x3_b, c1x1_c [c1, c2]; the
    residual path plus the new residual channels, the dense path, the new dense channels."""

    children_names = ("c1x1_w_s1", "c1x1_w_s2", "c1x1_a", "c3x3_b", "c1x1_c", "c1x1_c1", "c1x1_c2")

    def __init__(self, block: DualPathBlock, convert: Converter, path: str):
        super().__init__(block, convert, path)
        # parameter-free leaves under names timm's block does not use
        self.split = convert.leaf(ChannelSplit(block.num_1x1_c), f"{path}.split")
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat")

    def forward(self, x):
        projection = self.c1x1_w_s1 if self.c1x1_w_s1 is not None else self.c1x1_w_s2
        residual, dense = self.split(x if projection is None else projection(x))
        y = self.c1x1_c(self.c3x3_b(self.c1x1_a(x)))
        if self.c1x1_c1 is not None:
            out1, out2 = self.c1x1_c1(y), self.c1x1_c2(y)
        else:
            out1, out2 = self.split(y)
        return self.concat(residual + out1, dense, out2)


DPN_FAMILY = Family(
    name="dpn",
    timm_class=DPN,
    mirrors={DualPathBlock: MirrorDualPathBlock, BnActConv2d: MirrorBnActConv2d, BnAct: MirrorBnAct,
             ConvNormAct: MirrorConvNormAct},
    layout=ChildStages(),
)
