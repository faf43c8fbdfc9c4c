"""The HGNet family (timm ``HighPerfGpuNet``: PP-HGNet tiny/small/base, PP-HGNetV2 B0-B6, the
backbones of RT-DETR and D-FINE).

A block runs its layers in a chain (a conv-norm-act, or a "light" 1x1 then depthwise pair), joins
its input and every layer's output along the channels, and aggregates them by 1x1 conv-norm-acts
(V2) or one with an effective SE (ESE, V1), adding its input after the first block of a stage. A
stage strides by a depthwise 3x3 before its blocks. V2's stem splits after its first
convolution: a 2x2 max pooling and two 2x2 convolutions, each over the map padded by one site
below and right (hidden sites read zero, as that padding does), joined along the channels. Small
V2 models end conv-norm-acts with a learned scalar scale and shift (``lab``): it moves zero, so
the dense-masked engine masks after it. timm's ``head.last_conv`` runs on the pooled vector in
the classifier head: kept (frozen, never run) for strict loading.
"""

from __future__ import annotations

from timm.layers import Conv2dSame
from timm.models.hgnet import (ConvBNAct, HighPerfGpuBlock, HighPerfGpuNet, HighPerfGpuStage, LightConvBNAct, StemV1,
                               StemV2)
from torch import nn

from ..family import Family
from ..layouts import TappedStages
from ..leaves import ChannelConcat, ZeroPaddedMaxPool
from ..mirrors import Converter, MirrorDownsampleBlocks
from ..refusals import CheckpointingRefused, unsupported


def same_padded(conv: nn.Conv2d, path: str) -> Conv2dSame:
    """StemV2's ``F.pad(x, (0, 1, 0, 1))`` then its unpadded 2x2 stride-1 convolution, as one
    convolution with TensorFlow 'same' padding (timm's Conv2dSame pads an even kernel that way)."""
    if conv.kernel_size != (2, 2) or conv.stride != (1, 1) or conv.padding != (0, 0) or conv.groups != 1:
        raise unsupported(conv, path, f"kernel {conv.kernel_size}, stride {conv.stride}, padding {conv.padding}: "
                                      "StemV2 pads one site below and right for a 2x2 stride-1 convolution")
    same = Conv2dSame(conv.in_channels, conv.out_channels, 2, bias=conv.bias is not None,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    same.load_state_dict(conv.state_dict())
    return same.train(conv.training)


class MirrorConvBNAct(nn.Module):
    """timm's hgnet ConvBNAct: conv, bn, act, lab (a scalar affine, or an identity)."""

    def __init__(self, block: ConvBNAct, convert: Converter, path: str, padded: bool = False):
        super().__init__()
        conv = same_padded(block.conv, f"{path}.conv") if padded else block.conv
        self.conv = convert.leaf(conv, f"{path}.conv")
        for name in ("bn", "act", "lab"):
            setattr(self, name, convert.leaf(getattr(block, name), f"{path}.{name}"))

    def forward(self, x):
        return self.lab(self.act(self.bn(self.conv(x))))


class MirrorLightConvBNAct(nn.Module):
    """timm's LightConvBNAct: a 1x1 conv-norm, then a depthwise conv-norm-act."""

    def __init__(self, block: LightConvBNAct, convert: Converter, path: str):
        super().__init__()
        self.conv1 = convert(block.conv1, f"{path}.conv1")
        self.conv2 = convert(block.conv2, f"{path}.conv2")

    def forward(self, x):
        return self.conv2(self.conv1(x))


class MirrorStemV1(nn.Module):
    """PP-HGNet's stem: its conv-norm-acts (the first strides), then a 3x3 stride-2 max pooling."""

    def __init__(self, stem: StemV1, convert: Converter, path: str):
        super().__init__()
        self.stem = convert(stem.stem, f"{path}.stem")
        self.pool = convert.leaf(stem.pool, f"{path}.pool")

    def forward(self, x):
        return self.pool(self.stem(x))


class MirrorStemV2(nn.Module):
    """PP-HGNetV2's stem: stem1 (stride 2); its output max-pooled (2x2) beside stem2a then stem2b
    (2x2 convolutions), both over the map padded below and right; joined, then stem3 (stride 2)
    and stem4."""

    def __init__(self, stem: StemV2, convert: Converter, path: str):
        super().__init__()
        self.stem1 = convert(stem.stem1, f"{path}.stem1")
        self.stem2a = MirrorConvBNAct(stem.stem2a, convert, f"{path}.stem2a", padded=True)
        self.stem2b = MirrorConvBNAct(stem.stem2b, convert, f"{path}.stem2b", padded=True)
        self.stem3 = convert(stem.stem3, f"{path}.stem3")
        self.stem4 = convert(stem.stem4, f"{path}.stem4")
        pool = ZeroPaddedMaxPool(nn.ConstantPad2d((0, 1, 0, 1), 0.0), stem.pool)
        self.pool = convert.leaf(pool, f"{path}.pool")
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat")  # parameter-free, a name timm's stem lacks

    def forward(self, x):
        x = self.stem1(x)
        x = self.concat(self.pool(x), self.stem2b(self.stem2a(x)))
        return self.stem4(self.stem3(x))


class MirrorHighPerfGpuBlock(nn.Module):
    """timm's HighPerfGpuBlock: its layers in a chain, their outputs and its input joined, the
    aggregation, and its input added (with drop path) where it is residual."""

    def __init__(self, block: HighPerfGpuBlock, convert: Converter, path: str):
        super().__init__()
        self.layers = nn.ModuleList(convert(layer, f"{path}.layers.{i}") for i, layer in enumerate(block.layers))
        self.aggregation = convert(block.aggregation, f"{path}.aggregation")
        self.drop_path = convert.leaf(block.drop_path, f"{path}.drop_path")
        self.residual = block.residual
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat")  # parameter-free, a name timm's block lacks

    def forward(self, x):
        outputs = [x]
        for layer in self.layers:
            outputs.append(layer(outputs[-1]))
        y = self.aggregation(self.concat(*outputs))
        return self.drop_path(y) + x if self.residual else y


HGNET = Family(
    name="hgnet",
    timm_class=HighPerfGpuNet,
    mirrors={ConvBNAct: MirrorConvBNAct, LightConvBNAct: MirrorLightConvBNAct, StemV2: MirrorStemV2,
             StemV1: MirrorStemV1, HighPerfGpuBlock: MirrorHighPerfGpuBlock,
             HighPerfGpuStage: MirrorDownsampleBlocks},
    layout=TappedStages(),
    kept=("head.last_conv",),
    check=CheckpointingRefused("stages"),
    norm_acts={MirrorConvBNAct: (("bn", "act"),)},
)
