"""The RepGhost family (timm ``repghost``: RepGhostNet 0.5x .. 2.0x).

GhostNet's bottleneck (ghostnet.py) with re-parameterisable ghost modules: a 1x1 conv-norm[-ReLU]
(the primary), a depthwise 3x3 conv-norm of it (the cheap operation) plus, at train time, a batch
norm of the primary's rows (the fusion branch), summed over the same visible sites, then
[ReLU]; the cheap operation replaces the channel concatenation of GhostNet. Re-parameterised
(timm's ``switch_to_deploy``) the sum is one depthwise convolution with a bias: both forms convert.
The last stage ends with timm's 1x1 conv-bn-act (run before pooling); ``conv_head`` runs after
pooling and is kept, frozen.
"""

from __future__ import annotations

from timm.models._efficientnet_blocks import ConvBnAct
from timm.models.repghost import RepGhostBottleneck, RepGhostModule, RepGhostNet
from torch import nn

from .efficientnet import MirrorEfficientBlock
from ..family import Family
from ..layouts import BlockStages
from ..mirrors import Converter
from ..refusals import CheckpointingRefused
from .ghostnet import MirrorGhostBottleneck


class MirrorRepGhostModule(nn.Module):
    """timm's RepGhostModule: primary, its cheap depthwise operation + each fusion branch, relu."""

    def __init__(self, module: RepGhostModule, convert: Converter, path: str):
        super().__init__()
        self.primary_conv = convert(module.primary_conv, f"{path}.primary_conv")
        self.cheap_operation = convert(module.cheap_operation, f"{path}.cheap_operation")
        self.fusion_conv = nn.ModuleList(convert.leaf(c, f"{path}.fusion_conv.{i}")
                                         for i, c in enumerate(module.fusion_conv))
        self.fusion_bn = nn.ModuleList(convert.leaf(b, f"{path}.fusion_bn.{i}") for i, b in enumerate(module.fusion_bn))
        self.relu = convert.leaf(module.relu, f"{path}.relu")

    def forward(self, x):
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        for conv, bn in zip(self.fusion_conv, self.fusion_bn):
            x2 = x2 + bn(conv(x1))
        return self.relu(x2)


REPGHOST = Family(
    name="repghost",
    timm_class=RepGhostNet,
    # a RepGhost bottleneck runs as GhostNet's: ghost1, [depthwise strided conv-norm], [SE], ghost2, + shortcut
    mirrors={RepGhostModule: MirrorRepGhostModule, RepGhostBottleneck: MirrorGhostBottleneck,
             ConvBnAct: MirrorEfficientBlock},
    layout=BlockStages(("conv_stem", "bn1", "act1")),
    kept=("conv_head",),  # a 1x1 convolution after pooling, kept (frozen, never run) for strict loading
    check=CheckpointingRefused("blocks"),
)
