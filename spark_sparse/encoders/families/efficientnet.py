"""The EfficientNet and MobileNetV3 families (timm ``EfficientNet``, ``MobileNetV3``).

Both are one Sequential ``blocks`` of stages built from the same blocks: inverted residuals
(1x1 expansion, depthwise 3x3/5x5 that may stride, squeeze-excitation, 1x1 projection),
depthwise-separable and plain conv-bn-act blocks, EfficientNet-V2's fused "edge" residuals, and
MobileNetV4's universal inverted residuals (an optional depthwise conv before the 1x1 expansion,
one in the middle, one after the projection, each a conv-norm-act that may stride, then a layer
scale), and its hybrid models' attention blocks (multi-query attention, keys and values from a
strided depthwise convolution, each visible query attending to its image's visible keys). Each block
is its leaves in order, plus its input where timm's block has a skip. EfficientNet's
final 1x1 convolution and norm (``conv_head``, ``bn2``) run before pooling, so they end the last
stage; MobileNetV3's run after pooling, so they are kept (frozen, never run) for strict loading.
TensorFlow ports (``tf_*``, and the pruned EfficientNets) pad asymmetrically ("same", timm's
Conv2dSame) at stride 2: the engines' convolutions pad as they do.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from timm.layers import ConvNormAct, LayerScale2d, MixedConv2d, MultiQueryAttention2d
from timm.models._efficientnet_blocks import (ConvBnAct, CondConvResidual, DepthwiseSeparableConv, EdgeResidual,
                                              InvertedResidual, MobileAttention, UniversalInvertedResidual)
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.mobilenetv5 import MobileNetV5, MobileNetV5Encoder
from torch import nn

from ..attention import GroupedQueryAttention
from ..family import Family
from ..layouts import BlockStages
from ..leaves import ChannelConcat, ChannelSplit, ImageMean, split_in_turn
from ..mirrors import Converter, MirrorChildren, MirrorConvNormAct, MirrorLayerScale
from ..refusals import CheckpointingRefused, refuse_dropout, unsupported

# each block's leaves in the order its forward runs them
# (``aa``: anti-aliasing after the norm of a convolution that would stride; a 2x2 average pooling
# converts, as its windows lie in one patch)
LEAVES = {
    InvertedResidual: ("conv_pw", "bn1", "conv_dw", "bn2", "aa", "se", "conv_pwl", "bn3"),
    DepthwiseSeparableConv: ("conv_dw", "bn1", "aa", "se", "conv_pw", "bn2"),
    EdgeResidual: ("conv_exp", "bn1", "aa", "se", "conv_pwl", "bn2"),
    ConvBnAct: ("conv", "bn1", "aa"),
    # its sub-modules are conv-norm-acts (or identities) and a layer scale, mirrored as blocks
    UniversalInvertedResidual: ("dw_start", "pw_exp", "dw_mid", "se", "pw_proj", "dw_end", "layer_scale"),
}


class MirrorEfficientBlock(nn.Module):
    """Any of timm's EfficientNet blocks: its leaves in order, + its input if it has a skip."""

    def __init__(self, block: nn.Module, convert: Converter, path: str):
        super().__init__()
        # a space-to-depth convolution (2x2, stride 2) and its norm first, where the block has one
        s2d = ("conv_s2d", "bn_s2d") if getattr(block, "conv_s2d", None) is not None else ()
        self.leaves = s2d + LEAVES[type(block)]
        for name in self.leaves:
            self.add_module(name, convert(getattr(block, name), f"{path}.{name}"))
        self.has_skip = block.has_skip
        self.drop_path = convert.leaf(block.drop_path, f"{path}.drop_path")

    def forward(self, x):
        y = x
        for name in self.leaves:
            y = getattr(self, name)(y)
        return self.drop_path(y) + x if self.has_skip else y


class MirrorMixedConv2d(nn.Module):
    """timm's MixedConv2d (MixNet): the input's channels split into groups, each through its own
    convolution (depthwise 3x3/5x5/7x7/9x9, or 1x1), joined; the children keep timm's names."""

    def __init__(self, module: MixedConv2d, convert: Converter, path: str):
        super().__init__()
        for name, conv in module.items():
            self.add_module(name, convert.leaf(conv, f"{path}.{name}"))
        # parameter-free leaves under names timm's module does not use: a split for each group but the last
        self.splits = nn.ModuleList(convert.leaf(ChannelSplit(n), f"{path}.split") for n in module.splits[:-1])
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat")

    def forward(self, x):
        parts = split_in_turn(self.splits, x)
        convs = [child for name, child in self.named_children() if name.isdigit()]
        return self.concat(*(conv(part) for conv, part in zip(convs, parts)))


class MirrorCondConvResidual(nn.Module):
    """timm's CondConvResidual: routing weights from each image's visible mean (timm's own
    ``routing_fn`` and a sigmoid on (B, C) vectors), then an inverted residual whose three
    convolutions are CondConvs taking them, + its input if it has a skip."""

    def __init__(self, block: CondConvResidual, convert: Converter, path: str):
        super().__init__()
        for name in ("conv_pw", "bn1", "conv_dw", "bn2", "se", "conv_pwl", "bn3"):
            self.add_module(name, convert(getattr(block, name), f"{path}.{name}"))
        self.routing_fn = copy.deepcopy(block.routing_fn)
        self.mean = convert.leaf(ImageMean(), f"{path}.mean")  # parameter-free, a name timm's block lacks
        self.has_skip = block.has_skip
        self.drop_path = convert.leaf(block.drop_path, f"{path}.drop_path")

    def forward(self, x):
        routing = torch.sigmoid(self.routing_fn(self.mean(x)))
        y = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x, routing)), routing))
        y = self.bn3(self.conv_pwl(self.se(y), routing))
        return self.drop_path(y) + x if self.has_skip else y


class MirrorMultiQueryAttention2d(nn.Module):
    """timm's MultiQueryAttention2d: the query, key and value projections (key and value after a
    strided depthwise conv-norm where ``kv_stride`` > 1), the attention, the output projection."""

    def __init__(self, module: MultiQueryAttention2d, convert: Converter, path: str):
        super().__init__()
        if module.has_query_strides:
            raise unsupported(module, path, f"query strides {module.query_strides}: the output's bilinear "
                                            "upsampling reaches across patch borders")
        refuse_dropout(module, path, "attn_drop", "output.drop")
        for name in ("query", "key", "value"):
            setattr(self, name, convert(getattr(module, name), f"{path}.{name}"))
        self.attention = convert.leaf(GroupedQueryAttention(module.num_heads, module.key_dim, module.value_dim),
                                      f"{path}.attention")  # parameter-free, a name timm's module lacks
        # timm's output is the projection and its dropout (zero, checked above)
        self.output = nn.Sequential(OrderedDict(proj=convert.leaf(module.output.proj, f"{path}.output.proj")))

    def forward(self, x):
        return self.output(self.attention(self.query(x), self.key(x), self.value(x)))


class MirrorMobileAttention(MirrorChildren):
    """MobileNetV4's hybrid block: [x + a depthwise conv of x (CPE)], then layer scale (attention
    (norm(x))), + x where the block has a skip."""

    children_names = ("conv_cpe_dw", "norm", "attn", "layer_scale", "drop_path")

    def __init__(self, block: MobileAttention, convert: Converter, path: str):
        super().__init__(block, convert, path)
        self.has_skip = block.has_skip

    def forward(self, x):
        if self.conv_cpe_dw is not None:
            x = x + self.conv_cpe_dw(x)
        y = self.layer_scale(self.attn(self.norm(x)))
        return self.drop_path(y) + x if self.has_skip else y


MIRRORS = {block: MirrorEfficientBlock for block in LEAVES} | {ConvNormAct: MirrorConvNormAct,
                                                              LayerScale2d: MirrorLayerScale,
                                                              MixedConv2d: MirrorMixedConv2d,
                                                              CondConvResidual: MirrorCondConvResidual,
                                                              MobileAttention: MirrorMobileAttention,
                                                              MultiQueryAttention2d: MirrorMultiQueryAttention2d}

EFFICIENTNET = Family(
    name="efficientnet",
    timm_class=EfficientNet,
    mirrors=MIRRORS,
    layout=BlockStages(("conv_stem", "bn1"), head=("conv_head", "bn2")),
    check=CheckpointingRefused("blocks"),
)

MOBILENETV3 = Family(
    name="mobilenetv3",
    timm_class=MobileNetV3,
    mirrors=MIRRORS,
    layout=BlockStages(("conv_stem", "bn1")),
    kept=("conv_head", "norm_head"),
    check=CheckpointingRefused("blocks"),
    other_modules=("hardcorenas",),
)

# Gemma 3n's vision tower and its family: MobileNetV4's blocks with RMS norms; the multi-scale fusion
# adapter after the last stage (its output at stride 16) is the head, kept
MOBILENETV5 = Family(
    name="mobilenetv5",
    timm_class=MobileNetV5,
    other_classes=(MobileNetV5Encoder,),
    mirrors=MIRRORS,
    layout=BlockStages(("conv_stem",)),
    kept=("msfa",),
    check=CheckpointingRefused("blocks"),
)
