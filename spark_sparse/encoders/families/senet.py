"""The legacy SENet family (timm ``senet``: SE-ResNet-18..152, SE-ResNeXt-26/50/101 and SENet-154 as
ported from Caffe; timm's ``seresnet*`` of the resnet module are the maintained ones).

Residual blocks (basic, or bottlenecks striding in their first 1x1 (SE-ResNet) or in their grouped
3x3) gate their last norm's output by an SE over the visible sites before the shortcut. The stem
(a 7x7, or SENet-154's three 3x3s) ends in a 3x3 stride-2 max pooling without padding but with
``ceil_mode``, as VoVNet's: each window starts at its output's own site. A block runs one ``relu``
three times; the mirror holds it under three names, so that each norm before it can run with it
as one operator, and timm's names (none of them a tensor) still load.
"""

from __future__ import annotations

from timm.models.senet import SEBottleneck, SENet, SEResNetBlock, SEResNetBottleneck, SEResNeXtBottleneck
from torch import nn

from ..family import Family
from ..layouts import NamedStages
from ..mirrors import Converter


class _MirrorSEBlock(nn.Module):
    """A senet block with its leaves converted; timm's one ``relu`` under each name in ``acts``."""

    leaves: tuple[str, ...] = ()
    acts: tuple[str, ...] = ()

    def __init__(self, block: nn.Module, convert: Converter, path: str):
        super().__init__()
        for name in self.leaves:
            self.add_module(name, convert.leaf(getattr(block, name), f"{path}.{name}"))
        for name in self.acts:
            self.add_module(name, convert.leaf(block.relu, f"{path}.relu"))
        self.se_module = convert.leaf(block.se_module, f"{path}.se_module")
        self.downsample = convert(block.downsample, f"{path}.downsample")

    def residual(self, x, out):
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(self.se_module(out) + shortcut)


class MirrorSEBasicBlock(_MirrorSEBlock):
    """SEResNetBlock: 3x3 (strided), 3x3, each with its norm and relu (the second too, unlike
    timm's BasicBlock); SE, + the shortcut, relu."""

    leaves = ("conv1", "bn1", "conv2", "bn2")
    acts = ("act1", "act2", "relu")

    def forward(self, x):
        out = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        return self.residual(x, out)


class MirrorSEBottleneck(_MirrorSEBlock):
    """SEBottleneck, SEResNetBottleneck, SEResNeXtBottleneck: 1x1, 3x3 (either strided, grouped or
    not), 1x1; SE, + the shortcut, relu."""

    leaves = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
    acts = ("act1", "act2", "relu")

    def forward(self, x):
        out = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        return self.residual(x, self.bn3(self.conv3(out)))


SENET = Family(
    name="senet",
    timm_class=SENet,
    mirrors={SEResNetBlock: MirrorSEBasicBlock, SEBottleneck: MirrorSEBottleneck,
             SEResNetBottleneck: MirrorSEBottleneck, SEResNeXtBottleneck: MirrorSEBottleneck},
    layout=NamedStages(("layer0", "pool0"), ("layer1", "layer2", "layer3", "layer4")),
    norm_acts={mirror: (("bn1", "act1"), ("bn2", "act2")) for mirror in (MirrorSEBasicBlock, MirrorSEBottleneck)},
)
