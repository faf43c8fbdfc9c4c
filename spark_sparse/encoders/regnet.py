"""The RegNet family (timm ``RegNet``: RegNetX, and RegNetY with squeeze-excitation).

A stage is a sequence of bottlenecks (1x1, grouped 3x3 that may stride, SE, 1x1, + shortcut,
act); every convolution sits in timm's ``ConvNormAct`` (conv, batch norm with its activation).
Pre-activation blocks (RegNetV) are refused, as their stem-less first norm has no twin here.
"""

from __future__ import annotations

from timm.layers import ConvNormAct
from timm.models.regnet import Bottleneck, RegNet, RegStage
from torch import nn

from .family import Converter, Family, MirrorConvNormAct, NamedStages, refuse_checkpointing, unsupported


class MirrorRegBottleneck(nn.Module):
    """timm's RegNet Bottleneck: SE after the 3x3 (not after the last 1x1, as in ResNet)."""

    def __init__(self, block: Bottleneck, convert: Converter, path: str):
        super().__init__()
        for name in ("conv1", "conv2", "se", "conv3", "act3", "downsample", "drop_path"):
            setattr(self, name, convert(getattr(block, name), f"{path}.{name}"))

    def forward(self, x):
        shortcut = x
        x = self.conv3(self.se(self.conv2(self.conv1(x))))
        if self.downsample is not None:  # timm: None means a block without a shortcut
            x = self.drop_path(x) + self.downsample(shortcut)
        return self.act3(x)


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
            if type(block) is not Bottleneck:
                raise unsupported(block, f"{name}.{block_name}", "only RegNet's post-activation "
                                                                 "Bottleneck is mirrored")


REGNET = Family(
    name="regnet",
    timm_class=RegNet,
    mirrors={RegStage: MirrorRegStage, Bottleneck: MirrorRegBottleneck, ConvNormAct: MirrorConvNormAct},
    # RegNetX/Y have an Identity final_conv; where it is a ConvNormAct, it belongs to the features
    layout=NamedStages(("stem",), ("s1", "s2", "s3", "s4"), head=("final_conv",)),
    check=_check,
)
