"""The DLA family (timm ``dla``: Deep Layer Aggregation, DLA-34 .. DLA-169, the X and Res2Net
variants; CenterNet's and FairMOT's backbone).

A 7x7 and 3x3 conv-norm-ReLUs at stride 1 (on the pixels), a strided 3x3, then four aggregation
trees, each at twice the stride. A tree of one level runs two residual blocks (basic, bottleneck,
grouped, or Res2Net's hierarchical groups of channels) and joins their outputs, with its input
max-pooled (2x2, stride 2: windows inside one patch) where the tree is a stage's root, in a root
1x1 conv-norm-ReLU; a deeper tree nests two trees and hands the second the first's output to join.
The mirror keeps timm's recursion and names; additions and joins are of rows on the same sites.
"""

from __future__ import annotations

from timm.models.dla import DLA, DlaBasic, DlaBottle2neck, DlaBottleneck, DlaRoot, DlaTree
from torch import nn

from ..family import Family
from ..layouts import NamedStages
from ..leaves import ChannelConcat, ChannelSplit
from ..mirrors import Converter
from .res2net import hierarchical_groups


class _MirrorDlaBlock(nn.Module):
    """A DLA residual block with its leaves converted; timm's one ``relu`` under each name in
    ``acts`` (parameter-free), so that a norm and the relu after it can run as one operator."""

    leaves: tuple[str, ...] = ()
    acts: tuple[str, ...] = ("relu",)

    def __init__(self, block: nn.Module, convert: Converter, path: str):
        super().__init__()
        for name in self.leaves:
            self.add_module(name, convert(getattr(block, name), f"{path}.{name}"))
        for name in self.acts:
            self.add_module(name, convert.leaf(block.relu, f"{path}.relu"))


class MirrorDlaBasic(_MirrorDlaBlock):
    """DlaBasic: 3x3 (strided) conv-norm-relu, 3x3 conv-norm, + the shortcut (its input unless
    given), relu."""

    leaves = ("conv1", "bn1", "conv2", "bn2")
    acts = ("act1", "relu")

    def forward(self, x, shortcut=None):
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if shortcut is None else shortcut))


class MirrorDlaBottleneck(_MirrorDlaBlock):
    """DlaBottleneck: 1x1, 3x3 (strided, grouped in the X variants), 1x1, + the shortcut, relu."""

    leaves = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
    acts = ("act1", "act2", "relu")

    def forward(self, x, shortcut=None):
        out = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        return self.relu(self.bn3(self.conv3(out)) + (x if shortcut is None else shortcut))


class MirrorDlaBottle2neck(_MirrorDlaBlock):
    """DlaBottle2neck: Res2Net's bottleneck (res2net.hierarchical_groups) without SE or drop path."""

    leaves = ("conv1", "bn1", "pool", "conv3", "bn3")

    def __init__(self, block: DlaBottle2neck, convert: Converter, path: str):
        super().__init__(block, convert, path)
        self.convs = nn.ModuleList(convert.leaf(c, f"{path}.convs.{i}") for i, c in enumerate(block.convs))
        self.bns = nn.ModuleList(convert.leaf(b, f"{path}.bns.{i}") for i, b in enumerate(block.bns))
        self.is_first, self.scale = block.is_first, block.scale
        # parameter-free leaves under names timm's block does not use
        self.split = convert.leaf(ChannelSplit(block.width), f"{path}.split")
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat")

    def forward(self, x, shortcut=None):
        out = self.bn3(self.conv3(hierarchical_groups(self, self.relu(self.bn1(self.conv1(x))))))
        return self.relu(out + (x if shortcut is None else shortcut))


class MirrorDlaRoot(nn.Module):
    """DlaRoot: its children joined, a 1x1 conv-norm, [+ the first child], relu."""

    def __init__(self, root: DlaRoot, convert: Converter, path: str):
        super().__init__()
        for name in ("conv", "bn", "relu"):
            self.add_module(name, convert.leaf(getattr(root, name), f"{path}.{name}"))
        self.shortcut = root.shortcut
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat")  # parameter-free, a name timm's lacks

    def forward(self, children):
        x = self.bn(self.conv(self.concat(*children)))
        return self.relu(x + children[0] if self.shortcut else x)


class MirrorDlaTree(nn.Module):
    """DlaTree, recursion and all: the input downsampled (2x2 max pooling) and projected is the
    first block's shortcut, and a stage's root tree joins the downsampled input too."""

    def __init__(self, tree: DlaTree, convert: Converter, path: str):
        super().__init__()
        for name in ("downsample", "project", "tree1", "tree2", "root"):
            self.add_module(name, convert(getattr(tree, name), f"{path}.{name}"))
        self.level_root = tree.level_root

    def forward(self, x, shortcut=None, children=None):
        children = [] if children is None else children
        bottom = self.downsample(x)
        shortcut = self.project(bottom)
        if self.level_root:
            children.append(bottom)
        x1 = self.tree1(x, shortcut)
        if self.root is not None:  # one level: two blocks and their root
            return self.root([self.tree2(x1), x1] + children)
        children.append(x1)
        return self.tree2(x1, None, children)


DLA_FAMILY = Family(
    name="dla",
    timm_class=DLA,
    mirrors={DlaBasic: MirrorDlaBasic, DlaBottleneck: MirrorDlaBottleneck, DlaBottle2neck: MirrorDlaBottle2neck,
             DlaRoot: MirrorDlaRoot, DlaTree: MirrorDlaTree},
    layout=NamedStages(("base_layer", "level0", "level1"), ("level2", "level3", "level4", "level5")),
    norm_acts={MirrorDlaBasic: (("bn1", "act1"),), MirrorDlaBottleneck: (("bn1", "act1"), ("bn2", "act2"))},
)
