"""The CSPNeXt family (timm ``cspnext``: RTMDet's backbones, tiny to x).

A stage strides by a 3x3 conv-norm-act, then runs a cross-stage partial layer: two 1x1s split the
map into a short and a main branch, the main one runs blocks (a 3x3 conv-norm-act, then a depthwise
5x5 and a 1x1, each a conv-norm-act with SiLU; residual but in the last stage), the branches are
joined along the channels, gated by an effective SE over the visible sites and mixed by a 1x1. The
last stage puts a spatial pyramid pooling first: a 1x1, then its output beside its 5x5, 9x9 and
13x13 stride-1 max poolings, joined and mixed by a 1x1. At stride 32 a window spans up to six
patches either side: the sparse engine pools on the canvas (``patch_conv.canvas_max_pool``), the
maximum over the visible sites, as the dense-masked reference does with hidden sites at -inf.
"""

from __future__ import annotations

from timm.layers import ConvNormAct
from timm.models.cspnext import CspNext, CspNextBlock, CspNextLayer, DepthwiseSeparableConv, SPPBottleneck
from torch import nn

from ..family import Family
from ..layouts import TappedStages
from ..leaves import ChannelConcat
from ..mirrors import Converter, MirrorConvNormAct
from ..refusals import CheckpointingRefused


class MirrorDepthwiseSeparableConv(nn.Module):
    """cspnext's DepthwiseSeparableConv: a depthwise conv-norm-act, then a 1x1 one."""

    def __init__(self, block: DepthwiseSeparableConv, convert: Converter, path: str):
        super().__init__()
        self.depthwise_conv = convert(block.depthwise_conv, f"{path}.depthwise_conv")
        self.pointwise_conv = convert(block.pointwise_conv, f"{path}.pointwise_conv")

    def forward(self, x):
        return self.pointwise_conv(self.depthwise_conv(x))


class MirrorCspNextBlock(nn.Module):
    """timm's CspNextBlock: conv1, conv2, then drop path and + the input where it adds it."""

    def __init__(self, block: CspNextBlock, convert: Converter, path: str):
        super().__init__()
        self.conv1 = convert(block.conv1, f"{path}.conv1")
        self.conv2 = convert(block.conv2, f"{path}.conv2")
        self.drop_path = convert.leaf(block.drop_path, f"{path}.drop_path")
        self.add_identity = block.add_identity

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        return self.drop_path(out) + x if self.add_identity else out


class MirrorCspNextLayer(nn.Module):
    """timm's CspNextLayer: the main branch's blocks beside the short one, joined, attention, the
    final 1x1."""

    def __init__(self, layer: CspNextLayer, convert: Converter, path: str):
        super().__init__()
        self.short_conv = convert(layer.short_conv, f"{path}.short_conv")
        self.main_conv = convert(layer.main_conv, f"{path}.main_conv")
        self.blocks = nn.ModuleList(convert(block, f"{path}.blocks.{i}") for i, block in enumerate(layer.blocks))
        self.attention = convert.leaf(layer.attention, f"{path}.attention")
        self.final_conv = convert(layer.final_conv, f"{path}.final_conv")
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat")  # parameter-free, a name timm's lacks

    def forward(self, x):
        short = self.short_conv(x)
        main = self.main_conv(x)
        for block in self.blocks:
            main = block(main)
        return self.final_conv(self.attention(self.concat(main, short)))


class MirrorSPPBottleneck(nn.Module):
    """timm's SPPBottleneck: conv1, its output beside each stride-1 max pooling of it, conv2."""

    def __init__(self, block: SPPBottleneck, convert: Converter, path: str):
        super().__init__()
        self.conv1 = convert(block.conv1, f"{path}.conv1")
        self.poolings = nn.ModuleList(convert.leaf(pool, f"{path}.poolings.{i}")
                                      for i, pool in enumerate(block.poolings))
        self.conv2 = convert(block.conv2, f"{path}.conv2")
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat")  # parameter-free, a name timm's lacks

    def forward(self, x):
        x = self.conv1(x)
        return self.conv2(self.concat(x, *(pool(x) for pool in self.poolings)))


CSPNEXT = Family(
    name="cspnext",
    timm_class=CspNext,
    mirrors={ConvNormAct: MirrorConvNormAct, DepthwiseSeparableConv: MirrorDepthwiseSeparableConv,
             CspNextBlock: MirrorCspNextBlock, CspNextLayer: MirrorCspNextLayer, SPPBottleneck: MirrorSPPBottleneck},
    layout=TappedStages(),
    check=CheckpointingRefused("stages"),
)
