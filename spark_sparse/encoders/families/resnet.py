"""The ResNet family (timm ``ResNet``: BasicBlock and Bottleneck, deep stems, avg-down,
squeeze-excitation and efficient channel attention, and the anti-aliased ``resnetaa*``: a 2x2
average pooling after a stride-1 convolution and its activation, in the stem in place of the max
pooling; its windows lie in one patch, so nothing hidden leaks in, unlike a blur pooling's).
Res2Net's, ResNeSt's and SKNet's blocks (res2net.py, resnest.py, sknet.py) run in the same ResNet."""

from __future__ import annotations

from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from . import res2net, resnest, sknet
from ..family import Family
from ..layouts import NamedStages, StemPool
from ..mirrors import Converter
from ..refusals import reject_extras


class _MirrorBlock(nn.Module):
    """A timm residual block with its leaves converted; subclasses name the leaves and the order."""

    leaves: tuple[str, ...] = ()

    def __init__(self, block: nn.Module, convert: Converter, path: str):
        super().__init__()
        reject_extras(block, path, ("drop_block",))
        for name in self.leaves:
            setattr(self, name, convert.leaf(getattr(block, name), f"{path}.{name}"))
        self.se = None if block.se is None else convert.leaf(block.se, f"{path}.se")
        self.downsample = convert(block.downsample, f"{path}.downsample")
        self.drop_path = convert(block.drop_path, f"{path}.drop_path")

    def residual(self, x, shortcut):
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        return x + shortcut


class MirrorBasicBlock(_MirrorBlock):
    """timm's BasicBlock: conv-bn-act-conv-bn, + shortcut, act."""

    leaves = ("conv1", "bn1", "act1", "aa", "conv2", "bn2", "act2")

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.aa(self.act1(self.bn1(self.conv1(x))))
        x = self.bn2(self.conv2(x))
        return self.act2(self.residual(x, shortcut))


class MirrorBottleneck(_MirrorBlock):
    """timm's Bottleneck: 1x1, 3x3 (strided), 1x1, + shortcut, act."""

    leaves = ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "aa", "conv3", "bn3", "act3")

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.bn2(self.conv2(x))))
        x = self.bn3(self.conv3(x))
        return self.act3(self.residual(x, shortcut))


RESNET = Family(
    name="resnet",
    timm_class=ResNet,
    mirrors={BasicBlock: MirrorBasicBlock, Bottleneck: MirrorBottleneck, **res2net.MIRRORS, **resnest.MIRRORS,
             **sknet.MIRRORS},
    layout=NamedStages(("conv1", "bn1", "act1", "maxpool"), ("layer1", "layer2", "layer3", "layer4")),
    stem_pool=StemPool(act="act1", pool="maxpool"),  # engines pool first only where it is a max pooling
    other_modules=("res2net", "resnest", "sknet"),
    # the norms whose activation comes before the residual addition (not bn2 / bn3 of the last)
    norm_acts={MirrorBasicBlock: (("bn1", "act1"),), MirrorBottleneck: (("bn1", "act1"), ("bn2", "act2")),
               **resnest.NORM_ACTS},
)
