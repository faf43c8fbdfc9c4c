"""The RegNet family (timm ``RegNet``: RegNetX, RegNetY with squeeze-excitation, and the
pre-activation RegNetV).

A stage is a sequence of bottlenecks (1x1, grouped 3x3 that may stride, SE, 1x1, + shortcut,
act); every convolution sits in timm's ``ConvNormAct`` (conv, batch norm with its activation).
RegNetV's pre-activation bottlenecks run a norm-act before each convolution, the first one's
output also feeding the shortcut (a plain strided 1x1 where the block strides or widens); its
stem is a plain 3x3 stride-2 convolution and an activation ends the network.
"""

from __future__ import annotations

from timm.layers import ConvNormAct
from timm.models.regnet import Bottleneck, PreBottleneck, RegNet, RegStage
from torch import nn

from ..family import Family
from ..layouts import NamedStages
from ..mirrors import Converter, MirrorChildren, MirrorConvNormAct
from ..refusals import refuse_checkpointing, unsupported


class MirrorRegBottleneck(MirrorChildren):
    """timm's RegNet Bottleneck: SE after the 3x3 (not after the last 1x1, as in ResNet)."""

    children_names = ("conv1", "conv2", "se", "conv3", "act3", "downsample", "drop_path")

    def forward(self, x):
        shortcut = x
        x = self.conv3(self.se(self.conv2(self.conv1(x))))
        if self.downsample is not None:  # timm: None means a block without a shortcut
            x = self.drop_path(x) + self.downsample(shortcut)
        return self.act3(x)


class MirrorRegPreBottleneck(MirrorChildren):
    """timm's PreBottleneck (RegNetV): norm-act, 1x1, norm-act, grouped 3x3, SE, norm-act, 1x1,
    + the shortcut of the first norm-act's output (no act after the sum)."""

    children_names = ("norm1", "conv1", "norm2", "conv2", "se", "norm3", "conv3", "downsample", "drop_path")

    def forward(self, x):
        shortcut = x = self.norm1(x)
        x = self.conv3(self.norm3(self.se(self.conv2(self.norm2(self.conv1(x))))))
        if self.downsample is not None:
            x = self.drop_path(x) + self.downsample(shortcut)
        return x


class MirrorRegStage(nn.Module):
    """timm's RegStage: blocks b1, b2, ... in order."""

    def __init__(self, stage: RegStage, convert: Converter, path: str):
        super().__init__()
        for name, block in stage.named_children():
            self.add_module(name, convert(block, f"{path}.{name}"))

    def forward(self, x):
        for block in self.children():
            x = block(x)
        return x


def _check(model: nn.Module) -> None:
    for name in ("s1", "s2", "s3", "s4"):
        stage = getattr(model, name)
        refuse_checkpointing(stage, name)
        for block_name, block in stage.named_children():
            if type(block) not in (Bottleneck, PreBottleneck):
                raise unsupported(block, f"{name}.{block_name}", "only RegNet's Bottleneck and "
                                                                 "PreBottleneck are mirrored")


REGNET = Family(
    name="regnet",
    timm_class=RegNet,
    mirrors={RegStage: MirrorRegStage, Bottleneck: MirrorRegBottleneck, PreBottleneck: MirrorRegPreBottleneck,
             ConvNormAct: MirrorConvNormAct},
    # RegNetX/Y have an Identity final_conv; where it is a ConvNormAct (or RegNetV's activation), it
    # belongs to the features
    layout=NamedStages(("stem",), ("s1", "s2", "s3", "s4"), head=("final_conv",)),
    check=_check,
)
