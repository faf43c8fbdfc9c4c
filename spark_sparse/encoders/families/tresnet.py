"""The TResNet family (timm ``TResNet``: M, L, XL and V2-L, "High Performance GPU-Dedicated
Architecture").

The stem moves each 4x4 block of pixels into channels (space to depth: 48 channels at stride 4,
each block inside one patch), then a 3x3 conv-norm-LeakyReLU. Stages of ResNet basic blocks or
bottlenecks made of timm's conv-norm-acts (LeakyReLU, slope 1e-3): a block's strided 3x3 runs at
stride 1, then a blur pool halves the map; SE after the 3x3 in the first three stages; a strided
shortcut is a 2x2 average pooling then a 1x1 conv-norm; a ReLU after the sum.
"""

from __future__ import annotations

from timm.layers import ConvNormAct
from timm.models.tresnet import BasicBlock, Bottleneck, TResNet

from ..family import Family
from ..layouts import NamedStages
from ..mirrors import MirrorChildren, MirrorConvNormAct
from ..refusals import CheckpointingRefused


class MirrorTResNetBlock(MirrorChildren):
    """timm's TResNet BasicBlock or Bottleneck (no ``conv3`` in a basic block, no ``se`` in the last stage)."""

    children_names = ("downsample", "conv1", "conv2", "se", "conv3", "drop_path", "act")

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.conv1(x))
        if self.se is not None:
            out = self.se(out)
        if self.conv3 is not None:
            out = self.conv3(out)
        return self.act(self.drop_path(out) + shortcut)


TRESNET = Family(
    name="tresnet",
    timm_class=TResNet,
    mirrors={BasicBlock: MirrorTResNetBlock, Bottleneck: MirrorTResNetBlock, ConvNormAct: MirrorConvNormAct},
    layout=NamedStages(("body.s2d", "body.conv1"), ("body.layer1", "body.layer2", "body.layer3", "body.layer4")),
    check=CheckpointingRefused("body"),
)
