"""The RexNet family (timm ``RexNet``: ReXNet 1.0-3.0 and the rounded-channel ``rexnetr_*``).

The body is one Sequential ``features`` of linear bottlenecks (1x1 expansion with SiLU,
depthwise 3x3 that may stride, SE with a batch norm inside, ReLU6, 1x1 projection) and a final
1x1 conv-norm-act that runs before pooling (it ends the last stage). A bottleneck that widens
adds its input to its first channels only (a partial residual), the rest pass through.
"""

from __future__ import annotations

from timm.layers import ConvNormAct
from timm.models.rexnet import LinearBottleneck, RexNet

from ..family import Family
from ..layouts import BlockStages
from ..leaves import ChannelConcat, ChannelSplit
from ..mirrors import Converter, MirrorChildren, MirrorConvNormAct
from ..refusals import CheckpointingRefused


class MirrorLinearBottleneck(MirrorChildren):
    """timm's LinearBottleneck: [conv_exp], conv_dw, [se], act_dw, conv_pwl, + its input on the
    first channels where it has a shortcut."""

    children_names = ("conv_exp", "conv_dw", "se", "act_dw", "conv_pwl", "drop_path")

    def __init__(self, block: LinearBottleneck, convert: Converter, path: str):
        super().__init__(block, convert, path)
        self.use_shortcut = block.use_shortcut
        widens = block.use_shortcut and block.in_channels < block.out_channels
        # parameter-free leaves under names timm's block does not use
        self.split = convert.leaf(ChannelSplit(block.in_channels), f"{path}.split") if widens else None
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat") if widens else None

    def forward(self, x):
        shortcut = x
        y = x if self.conv_exp is None else self.conv_exp(x)
        y = self.conv_dw(y)
        if self.se is not None:
            y = self.se(y)
        y = self.conv_pwl(self.act_dw(y))
        if not self.use_shortcut:
            return y
        if self.drop_path is not None:
            y = self.drop_path(y)
        if self.split is None:
            return y + shortcut
        first, rest = self.split(y)
        return self.concat(first + shortcut, rest)


REXNET = Family(
    name="rexnet",
    timm_class=RexNet,
    mirrors={LinearBottleneck: MirrorLinearBottleneck, ConvNormAct: MirrorConvNormAct},
    layout=BlockStages(("stem",), body="features"),
    check=CheckpointingRefused("features"),
)
