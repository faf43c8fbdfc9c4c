"""The GhostNet family (timm ``GhostNet``, version 1: ``ghostnet_050/100/130``).

A ghost module makes half its channels with a 1x1 convolution and the other half cheaply from
those, by a depthwise 3x3 (each with batch norm and, in the first module of a bottleneck, ReLU),
side by side. A ghost bottleneck is ghost module,
[depthwise strided conv + norm], [SE], ghost module, + its input (or a depthwise strided conv,
norm, 1x1, norm of it where width or stride change). The last stage ends with timm's 1x1
conv-bn-act (run before pooling). Version 2's DFC attention pools the map into a coarser one and
upsamples it back across patch borders, and version 3's modules re-parameterise branches: both
refused.
"""

from __future__ import annotations

from timm.models._efficientnet_blocks import ConvBnAct
from timm.models.ghostnet import GhostBottleneck, GhostBottleneckV3, GhostModule, GhostModuleV2, GhostModuleV3, GhostNet
from torch import nn

from .efficientnet import MirrorEfficientBlock
from .family import BlockStages, ChannelConcat, CheckpointingRefused, Converter, Family, MirrorChildren, unsupported


class MirrorGhostModule(nn.Module):
    """timm's GhostModule: primary (1x1) and cheap (depthwise 3x3 of the primary) side by side.
    (timm cuts them to ``out_chs``, which its GhostNets' widths, multiples of 4, never need.)"""

    def __init__(self, module: GhostModule, convert: Converter, path: str):
        super().__init__()
        made = module.primary_conv[0].out_channels + module.cheap_operation[0].out_channels
        if made != module.out_chs:
            raise unsupported(module, path, f"{made} channels cut to {module.out_chs} are not mirrored")
        self.primary_conv = convert(module.primary_conv, f"{path}.primary_conv")
        self.cheap_operation = convert(module.cheap_operation, f"{path}.cheap_operation")
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat")  # parameter-free, a name timm's lacks

    def forward(self, x):
        x1 = self.primary_conv(x)
        return self.concat(x1, self.cheap_operation(x1))


class MirrorGhostBottleneck(MirrorChildren):
    children_names = ("ghost1", "conv_dw", "bn_dw", "se", "ghost2", "shortcut")

    def forward(self, x):
        y = self.ghost1(x)
        if self.conv_dw is not None:
            y = self.bn_dw(self.conv_dw(y))
        if self.se is not None:
            y = self.se(y)
        return self.ghost2(y) + self.shortcut(x)


V3_REFUSED = "GhostNetV3's re-parameterisable branches are not mirrored; use a ghostnet_* (version 1) model"


GHOSTNET = Family(
    name="ghostnet",
    timm_class=GhostNet,
    mirrors={GhostModule: MirrorGhostModule, GhostBottleneck: MirrorGhostBottleneck, ConvBnAct: MirrorEfficientBlock},
    layout=BlockStages(("conv_stem", "bn1", "act1")),
    kept=("conv_head",),  # a 1x1 convolution after pooling, kept (frozen, never run) for strict loading
    check=CheckpointingRefused("blocks"),
    refused={
        GhostModuleV2: "GhostNetV2's DFC attention pools the map and upsamples it back across patch borders; "
                       "use a ghostnet_* (version 1) model",
        GhostModuleV3: V3_REFUSED,
        GhostBottleneckV3: V3_REFUSED,
    },
)
