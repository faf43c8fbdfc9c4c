"""The VoVNet family (timm ``vovnet``: VoVNet-39/57 V1, the ESE-VoVNet V2 nets, CenterMask's
backbones).

A one-shot aggregation (OSA) block runs its 3x3 conv-norm-acts (or depthwise-separable ones,
after a 1x1 reduction) in a chain, joins its input and every layer's output along the channels
once, and mixes them with a 1x1 conv-norm-act; the last block of a stage gates that by an
effective SE (or ECA) over the visible sites, and V2's later blocks add their input. A stage
(but the first) starts with a 3x3 stride-2 max pooling, unpadded with ``ceil_mode``: each
window starts at its output's own site and may reach one row and column into the next patch.
It reads ReLU outputs, so the zeros of hidden sites that dense masking would see never win:
both engines take the maximum over the visible sites.
"""

from __future__ import annotations

from timm.layers import ConvNormAct, SeparableConvNormAct
from timm.models.vovnet import OsaBlock, OsaStage, VovNet
from torch import nn

from ..family import Family
from ..layouts import TappedStages
from ..leaves import ChannelConcat
from ..mirrors import Converter, MirrorConvNormAct
from ..refusals import CheckpointingRefused


class MirrorSeparableConvNormAct(nn.Module):
    """timm's SeparableConvNormAct: a depthwise convolution, a pointwise one, then the norm with
    its activation."""

    def __init__(self, block: SeparableConvNormAct, convert: Converter, path: str):
        super().__init__()
        for name in ("conv_dw", "conv_pw", "bn"):
            self.add_module(name, convert.leaf(getattr(block, name), f"{path}.{name}"))

    def forward(self, x):
        return self.bn(self.conv_pw(self.conv_dw(x)))


class MirrorOsaBlock(nn.Module):
    """timm's OsaBlock: [a 1x1 reduction,] its layers in a chain (timm's ``conv_mid``), their
    outputs and its input joined, the 1x1 ``conv_concat``, [attention, drop path,] + the input
    where it is residual."""

    def __init__(self, block: OsaBlock, convert: Converter, path: str):
        super().__init__()
        self.conv_reduction = convert(block.conv_reduction, f"{path}.conv_reduction")
        self.conv_mid = nn.ModuleList(convert(layer, f"{path}.conv_mid.{i}") for i, layer in enumerate(block.conv_mid))
        self.conv_concat = convert(block.conv_concat, f"{path}.conv_concat")
        self.attn = convert.leaf(block.attn, f"{path}.attn") if block.attn is not None else None
        self.drop_path = convert.leaf(block.drop_path, f"{path}.drop_path") if block.drop_path is not None else None
        self.residual = block.residual
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat")  # parameter-free, a name timm's block lacks

    def forward(self, x):
        outputs = [x]
        y = x if self.conv_reduction is None else self.conv_reduction(x)
        for layer in self.conv_mid:
            y = layer(y)
            outputs.append(y)
        y = self.conv_concat(self.concat(*outputs))
        if self.attn is not None:
            y = self.attn(y)
        if self.drop_path is not None:
            y = self.drop_path(y)
        return y + x if self.residual else y


class MirrorOsaStage(nn.Module):
    """timm's OsaStage: the max pooling (none in the first), then its blocks."""

    def __init__(self, stage: OsaStage, convert: Converter, path: str):
        super().__init__()
        self.pool = convert.leaf(stage.pool, f"{path}.pool") if stage.pool is not None else None
        self.blocks = convert(stage.blocks, f"{path}.blocks")

    def forward(self, x):
        return self.blocks(x if self.pool is None else self.pool(x))


VOVNET = Family(
    name="vovnet",
    timm_class=VovNet,
    mirrors={ConvNormAct: MirrorConvNormAct, SeparableConvNormAct: MirrorSeparableConvNormAct,
             OsaBlock: MirrorOsaBlock, OsaStage: MirrorOsaStage},
    layout=TappedStages(),
    check=CheckpointingRefused("stages"),
)
