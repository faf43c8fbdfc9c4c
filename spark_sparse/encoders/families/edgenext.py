"""The EdgeNeXt family (timm ``edgenext``: xx_small, x_small, small, base and Ross Wightman's
small_rw).

ConvNeXt's layout with a conv-encoder block per stage step (a depthwise k x k, 3 to 9 by stage,
a layer norm, an MLP, a layer scale, drop path, plus its input) and, ending each stage after the
first, one split depth-wise transposed attention block (SDTA): its channels cut into groups,
each but the last through a depthwise 3x3 after adding the previous group's output (Res2Net's
hierarchy), joined; in the second stage an absolute Fourier position encoding added
(``attention.FourierPositions``); then x + cross-covariance attention of the layer-normed tokens
(``attention.CrossCovarianceAttention``: attention between channels, its sums over each image's
visible tokens) and x + MLP, each layer-scaled. The stem is a 4x4 stride-4 patchify convolution
(small_rw: a 9x9 one, padded) and a layer norm; later stages start with a layer norm and a 2x2
stride-2 convolution, or (small_rw) with a conv-encoder block whose depthwise convolution strides
and widens. The position encoding is absolute over the map: an image embedded in a larger canvas
is another input (timm's too), the one property of a sparse encoder EdgeNeXt does not keep.
timm's head norm runs on the pooled vector: kept, frozen.
"""

from __future__ import annotations

import torch
from timm.layers import Mlp
from timm.models.edgenext import ConvBlock, CrossCovarianceAttn, EdgeNeXt, EdgeNeXtStage, SplitTransposeBlock
from torch import nn

from ..attention import CrossCovarianceAttention
from .convnext import MirrorMlp
from ..family import Family
from ..layouts import NamedStages
from ..leaves import ChannelConcat, ChannelSplit, split_in_turn
from ..mirrors import Converter, MirrorChildren, MirrorDownsampleBlocks, mirror_layer_scale
from ..refusals import CheckpointingRefused, unsupported


class MirrorConvBlock(MirrorChildren):
    """The conv-encoder block: conv_dw, norm, MLP, [gamma], drop path, plus the input (or, where the
    block strides or widens, plus conv_dw's output, as timm's ``shortcut_after_dw``)."""

    children_names = ("conv_dw", "norm", "mlp", "drop_path")

    def __init__(self, block: ConvBlock, convert: Converter, path: str):
        super().__init__(block, convert, path)
        mirror_layer_scale(self, block, convert, path)
        self.shortcut_after_dw = block.shortcut_after_dw

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x)
        if self.shortcut_after_dw:
            shortcut = x
        x = self.mlp(self.norm(x))
        if self.gamma is not None:
            x = self.scale(x, self.gamma)
        return shortcut + self.drop_path(x)


class MirrorCrossCovarianceAttn(MirrorChildren):
    """qkv, the attention between channels with timm's per-head ``temperature``, proj."""

    children_names = ("qkv", "proj")
    dropouts = ("attn_drop", "proj_drop")

    def __init__(self, module: CrossCovarianceAttn, convert: Converter, path: str):
        super().__init__(module, convert, path)
        self.temperature = nn.Parameter(module.temperature.detach().clone())
        self.attention = convert.leaf(CrossCovarianceAttention(module.num_heads), f"{path}.attention")

    def forward(self, x):
        return self.proj(self.attention(self.qkv(x), self.temperature))


class MirrorSplitTransposeBlock(MirrorChildren):
    """SDTA: the hierarchical depthwise 3x3s over groups of channels, [the position encoding],
    x + gamma_xca * xca(norm_xca(x)), then norm, MLP, [gamma], drop path, plus the block's input.
    timm's one drop path module runs on both branches (two draws)."""

    children_names = ("norm_xca", "xca", "norm", "mlp", "drop_path", "pos_embd")

    def __init__(self, block: SplitTransposeBlock, convert: Converter, path: str):
        super().__init__(block, convert, path)
        self.convs = nn.ModuleList(convert(c, f"{path}.convs.{i}") for i, c in enumerate(block.convs))
        channels, groups = block.norm.normalized_shape[0], len(block.convs) + 1
        if len(torch.empty(channels).chunk(groups)) != groups:  # timm's forward would fail too
            raise unsupported(block, path, f"{channels} channels do not chunk into {groups} groups")
        mirror_layer_scale(self, block, convert, path, "gamma_xca")
        if self.gamma_xca is None:
            raise unsupported(block, path, "no layer scale on the attention (timm's forward needs one)")
        mirror_layer_scale(self, block, convert, path)
        # parameter-free leaves under names timm's block does not use
        self.split = convert.leaf(ChannelSplit(block.width), f"{path}.split")
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat")

    def forward(self, x):
        shortcut = x
        groups = split_in_turn([self.split] * len(self.convs), x)
        outputs = []
        for i, conv in enumerate(self.convs):
            outputs.append(conv(groups[0] if i == 0 else outputs[-1] + groups[i]))
        x = self.concat(*outputs, groups[-1])
        if self.pos_embd is not None:
            x = self.pos_embd(x)
        x = x + self.drop_path(self.scale(self.xca(self.norm_xca(x)), self.gamma_xca))
        x = self.mlp(self.norm(x))
        if self.gamma is not None:
            x = self.scale(x, self.gamma)
        return shortcut + self.drop_path(x)


EDGENEXT = Family(
    name="edgenext",
    timm_class=EdgeNeXt,
    mirrors={EdgeNeXtStage: MirrorDownsampleBlocks, ConvBlock: MirrorConvBlock, SplitTransposeBlock:
             MirrorSplitTransposeBlock, CrossCovarianceAttn: MirrorCrossCovarianceAttn, Mlp: MirrorMlp},
    layout=NamedStages(("stem",), ("stages.0", "stages.1", "stages.2", "stages.3")),
    kept=("norm_pre", "head.norm", "head.pre_logits"),
    check=CheckpointingRefused("stages"),
)
