"""The CSPNet family (timm ``cspnet``: CSPResNet, CSPResNeXt, CSPDarkNet, DarkNet, the CS3 nets).

A cross-stage partial stage downsamples (a strided 3x3 conv-norm-act, or a 2x2 average pooling
and a 1x1), expands with a 1x1, splits the channels in two, runs one half through its blocks
(ResNet bottlenecks, DarkNet 1x1-3x3 or edge 3x3-1x1 residuals), concatenates the halves (after
a 1x1 "transition" of the blocks' half in ``CrossStage``) and mixes them with a 1x1 transition.
A DarkNet stage is the downsampling and the blocks, without the split. The split and the
concatenation are per-site channel operations: both engines run them on the visible sites.
DarkNet-53 and CSPDarkNet-53 keep their stem at stride 1 and their first stage at stride 2;
both run before the stride-4 stage, as the encoder's stem.
"""

from __future__ import annotations

from timm.layers import ConvNormAct
from timm.models.cspnet import BottleneckBlock, CrossStage, CrossStage3, CspNet, DarkBlock, DarkStage, EdgeBlock
from torch import nn

from ..family import Family
from ..layouts import TappedStages
from ..leaves import ChannelConcat, ChannelSplit
from ..mirrors import Converter, MirrorConvNormAct

# each block's sub-modules in the order its forward runs them, and its activation after the
# residual addition (DarkNet's and the edge block end with the addition)
BLOCKS = {
    BottleneckBlock: (("conv1", "conv2", "attn2", "conv3", "attn3"), "act3"),
    DarkBlock: (("conv1", "attn", "conv2"), None),
    EdgeBlock: (("conv1", "attn", "conv2"), None),
}


class MirrorCspBlock(nn.Module):
    """cspnet's residual blocks: sub-modules in order, drop path, + the input, [activation]."""

    def __init__(self, block: nn.Module, convert: Converter, path: str):
        super().__init__()
        self.order, self.act_name = BLOCKS[type(block)]
        for name in self.order + ("drop_path",) + ((self.act_name,) if self.act_name else ()):
            self.add_module(name, convert(getattr(block, name), f"{path}.{name}"))

    def forward(self, x):
        shortcut = x
        for name in self.order:
            x = getattr(self, name)(x)
        x = self.drop_path(x) + shortcut
        return getattr(self, self.act_name)(x) if self.act_name else x


class MirrorCrossStage(nn.Module):
    """``CrossStage`` and ``CrossStage3``: [downsample], 1x1 expansion, split; blocks on one half
    ([and a 1x1 transition]), concatenation, 1x1 transition."""

    def __init__(self, stage: nn.Module, convert: Converter, path: str):
        super().__init__()
        names = ("conv_down", "conv_exp", "blocks", "conv_transition_b", "conv_transition")
        for name in names:
            self.add_module(name, convert(getattr(stage, name, None), f"{path}.{name}"))
        self.split = convert.leaf(ChannelSplit(stage.expand_chs // 2), f"{path}.split")
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat")
        # the half the blocks run on: CrossStage3's first, CrossStage's second; the halves are
        # concatenated in their order
        self.blocks_half = 0 if type(stage) is CrossStage3 else 1

    def forward(self, x):
        if self.conv_down is not None:  # CrossStage3's is None without a stride
            x = self.conv_down(x)
        halves = list(self.split(self.conv_exp(x)))
        part = self.blocks(halves[self.blocks_half])
        if self.conv_transition_b is not None:  # CrossStage only
            part = self.conv_transition_b(part)
        halves[self.blocks_half] = part
        return self.conv_transition(self.concat(*halves))


class MirrorDarkStage(nn.Module):
    """DarkNet's stage: a strided conv-norm-act (or avg-down), then the blocks."""

    def __init__(self, stage: DarkStage, convert: Converter, path: str):
        super().__init__()
        self.conv_down = convert(stage.conv_down, f"{path}.conv_down")
        self.blocks = convert(stage.blocks, f"{path}.blocks")

    def forward(self, x):
        return self.blocks(self.conv_down(x))


CSPNET = Family(
    name="cspnet",
    timm_class=CspNet,
    mirrors={**{block: MirrorCspBlock for block in BLOCKS}, CrossStage: MirrorCrossStage,
             CrossStage3: MirrorCrossStage, DarkStage: MirrorDarkStage, ConvNormAct: MirrorConvNormAct},
    layout=TappedStages(),
)
