"""Res2Net's blocks (timm's ``res2net`` module: ResNet models of Bottle2neck blocks).

A bottleneck splits its 1x1's output into ``scale`` groups of channels: the first groups each go
through a 3x3 conv-norm-ReLU, each (after a stage's first block) added to the previous one's
output first; the last group passes through, or, in a stage's first block, through a 3x3 average
pooling at the block's stride (hidden sites read zero and are counted, as the padding); the
groups are concatenated for the last 1x1. The family is timm's ResNet (resnet.py).
"""

from __future__ import annotations

from timm.models.res2net import Bottle2neck
from torch import nn

from ..leaves import ChannelConcat, ChannelSplit, split_in_turn
from ..mirrors import Converter, MirrorChildren
from ..refusals import reject_extras


def hierarchical_groups(block: nn.Module, out):
    """A Res2Net bottleneck's middle, on its first 1x1's output: the groups of channels (``split``
    one at a time, as timm's torch.split by width), each of the first through ``convs``, ``bns``
    and ``relu`` after adding the previous one's output (not in a stage's first block,
    ``is_first``), the last passed through or ``pool``-ed, all joined (``concat``). Shared by
    timm's Bottle2neck and DLA's DlaBottle2neck, which hold these under the same names."""
    groups = split_in_turn([block.split] * (block.scale - 1), out)
    outputs = []
    for i, (conv, bn) in enumerate(zip(block.convs, block.bns)):
        sp = groups[i] if i == 0 or block.is_first else outputs[-1] + groups[i]
        outputs.append(block.relu(bn(conv(sp))))
    if block.scale > 1:
        outputs.append(groups[-1] if block.pool is None else block.pool(groups[-1]))
    return block.concat(*outputs)


class MirrorBottle2neck(MirrorChildren):
    """timm's Bottle2neck: conv1, bn1, relu, the chain of group convolutions, [pool], conv3, bn3,
    [se], [drop path], + shortcut, relu (one ReLU module, as timm's)."""

    children_names = ("conv1", "bn1", "relu", "pool", "conv3", "bn3", "se", "downsample", "drop_path")

    def __init__(self, block: Bottle2neck, convert: Converter, path: str):
        reject_extras(block, path, ("drop_block",))
        super().__init__(block, convert, path)
        self.convs = nn.ModuleList(convert(c, f"{path}.convs.{i}") for i, c in enumerate(block.convs))
        self.bns = nn.ModuleList(convert(b, f"{path}.bns.{i}") for i, b in enumerate(block.bns))
        self.is_first, self.scale = block.is_first, block.scale
        # parameter-free leaves under names timm's block does not use
        self.split = convert.leaf(ChannelSplit(block.width), f"{path}.split")
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat")

    def forward(self, x):
        out = self.bn3(self.conv3(hierarchical_groups(self, self.relu(self.bn1(self.conv1(x))))))
        if self.se is not None:
            out = self.se(out)
        if self.drop_path is not None:
            out = self.drop_path(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


MIRRORS = {Bottle2neck: MirrorBottle2neck}
