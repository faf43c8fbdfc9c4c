"""The MaxViT and CoAtNet family (timm ``maxxvit``: MaxViT's TensorFlow ports and timm's own
``maxvit_*_rw``, ``maxxvit*`` with ConvNeXt blocks, CoAtNet's ``coatnet_*``, ``coatnext``).

A stem of two 3x3s (the first strided), then four stages of blocks, each stage's first striding:
pre-norm MBConvs (a batch norm, 1x1, norm-act, depthwise 3x3, norm-act, SE, 1x1, plus the input
average-pooled and widened where the block strides) or ConvNeXt blocks; MaxViT's blocks follow one
with two transformer blocks, x + attention(norm(x)) then x + MLP(norm(x)): the first attends within
groups of w x w sites from the map's corner, the second within grids of w x w sites spread evenly
over the map (one in each of its w x w blocks), both with a learned bias per pair of places in the
group (a table, TensorFlow's table of row and column offsets, or an MLP of log-spaced offsets: timm's
own module, run on its table, not on features). timm sets w from the size it builds the model for
(``img_size`` / 32: 7 at 224 px, where a grid's sites are one patch apart at every stride); CoAtNet's
transformer blocks (after pooling where they stride) attend over the whole map of that size with a
bias per pair of sites, here within groups of that size from the corner (the whole map at the
model's size; timm runs no other). Each visible token attends to its group's visible tokens.

timm refuses maps of no whole groups and grids (its own input size and its multiples run); the
grid attention spreads its groups over the map it is given, so an image's groups depend on the
canvas around it: MaxViT keeps batch independence, not canvas invariance, in timm and here.
"""

from __future__ import annotations

import copy
import math

from timm.layers import ConvMlp, LayerScale, LayerScale2d, Mlp
from timm.models.maxxvit import (ConvNeXtBlock, Downsample2d, MaxxVit, MaxxVitBlock,
                                 MaxxVitStage, MbConvBlock, ParallelMaxxVitBlock, ParallelPartitionAttention,
                                 PartitionAttention2d, PartitionAttentionCl, Stem, TransformerBlock2d)
from torch import nn

from ..attention import GridAttention, WindowAttention
from .convnext import MirrorMlp
from ..family import Family, InputSizes, meta_model
from ..layouts import NamedStages
from ..leaves import ChannelConcat, square
from ..mirrors import Converter, MirrorChildren, MirrorInOrder, MirrorLayerScale
from ..refusals import CheckpointingRefused, unsupported
from .mobilevit import MirrorConvMlp

PARTITIONED = (PartitionAttentionCl, PartitionAttention2d, ParallelPartitionAttention)


def input_sizes(name: str) -> InputSizes:
    """A MaxViT's: multiples of 32 times its groups' and grids' side (its own size; timm asserts
    whole ones at every stride); a CoAtNet's or MaxxViT's without partitions: multiples of 32."""
    model = meta_model(name)
    sides = {block.partition_size[0] for block in model.modules() if isinstance(block, PARTITIONED)}
    return InputSizes(32 * math.lcm(*sides) if sides else 32,
                      "attends within groups and grids of sites that must be whole at every stride (timm asserts so)")


class MirrorAttention(MirrorChildren):
    """qkv, attention within the block's groups of ``side`` x ``side`` sites (from the map's corner,
    or spread over it where ``grid``) plus the relative position bias, proj; ``rel_pos`` keeps
    timm's module and name, q, k, v keep timm's order (``head_first``: each head's side by side)."""

    children_names = ("qkv", "proj")
    dropouts = ("attn_drop", "proj_drop")

    def __init__(self, module: nn.Module, convert: Converter, path: str, side: int, grid: bool = False):
        super().__init__(module, convert, path)
        self.rel_pos = copy.deepcopy(module.rel_pos)  # on its table of offsets, not on features: timm's own
        heads, head_dim = module.num_heads, module.dim_head
        attention = (GridAttention(heads, head_dim, side, spread=True, per_head=module.head_first) if grid else
                     WindowAttention(heads, head_dim, head_dim, side, per_head=module.head_first))
        self.attention = convert.leaf(attention, f"{path}.attention")  # parameter-free, a name timm's lacks

    def forward(self, x):
        bias = None
        if self.rel_pos is not None:  # (1, heads, L, L); TensorFlow's table gives (heads, L, L)
            bias = self.rel_pos.get_bias()
            bias = bias.view(-1, *bias.shape[-2:])
        return self.proj(self.attention(self.qkv(x), bias))


class MirrorPartitionAttention(MirrorChildren):
    """MaxViT's transformer block: x + drop_path1(ls1(attn(norm1(x)))), then x + drop_path2(ls2(mlp(norm2(x)))),
    the attention within its groups (``partition_block``) or its grids."""

    children_names = ("norm1", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")

    def __init__(self, block: nn.Module, convert: Converter, path: str):
        super().__init__(block, convert, path)
        side = square(block.partition_size, block, path)
        self.attn = MirrorAttention(block.attn, convert, f"{path}.attn", side, grid=not block.partition_block)

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class MirrorParallelPartitionAttention(MirrorChildren):
    """The parallel variant (``maxvit_tiny_pm``): group and grid attention side by side, each
    half the width, their outputs concatenated, one MLP."""

    children_names = ("norm1", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")

    def __init__(self, block: ParallelPartitionAttention, convert: Converter, path: str):
        super().__init__(block, convert, path)
        side = square(block.partition_size, block, path)
        self.attn_block = MirrorAttention(block.attn_block, convert, f"{path}.attn_block", side)
        self.attn_grid = MirrorAttention(block.attn_grid, convert, f"{path}.attn_grid", side, grid=True)
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat")  # parameter-free, a name timm's lacks

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.drop_path1(self.ls1(self.concat(self.attn_block(y), self.attn_grid(y))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class MirrorTransformerBlock(MirrorChildren):
    """CoAtNet's: shortcut(x) + drop_path1(ls1(attn(norm1(x)))) (norm1 then pools where the block
    strides; the shortcut pools and widens), then x + drop_path2(ls2(mlp(norm2(x)))); the attention
    within groups of the size its bias was built for."""

    children_names = ("shortcut", "norm1", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")

    def __init__(self, block: TransformerBlock2d, convert: Converter, path: str):
        super().__init__(block, convert, path)
        if block.attn.rel_pos is None:
            raise unsupported(block.attn, f"{path}.attn", "attention over the whole map without a relative "
                                                          "position bias (no size of its groups)")
        side = square(block.attn.rel_pos.window_size, block.attn, f"{path}.attn")
        self.attn = MirrorAttention(block.attn, convert, f"{path}.attn", side)

    def forward(self, x):
        x = self.shortcut(x) + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class MirrorMbConv(MirrorChildren):
    """shortcut(x) + drop_path(conv3_1x1(se(norm2(se_early(conv2_kxk(norm1(conv1_1x1(down(pre_norm(x)))))))))),
    the SE before or after norm2 as the block has it."""

    children_names = ("shortcut", "pre_norm", "down", "conv1_1x1", "norm1", "conv2_kxk", "se_early", "norm2", "se",
                      "conv3_1x1", "drop_path")

    def forward(self, x):
        shortcut = self.shortcut(x)
        x = self.conv2_kxk(self.norm1(self.conv1_1x1(self.down(self.pre_norm(x)))))
        for name in ("se_early", "norm2", "se"):
            if getattr(self, name) is not None:
                x = getattr(self, name)(x)
        return self.drop_path(self.conv3_1x1(x)) + shortcut


class MirrorConvNeXtBlock(MirrorChildren):
    """maxxvit's ConvNeXt block: shortcut(x) + drop_path(ls(mlp(norm(conv_dw(down(x)))))) (the
    depthwise 7x7 strides and widens where the block does; the shortcut pools and widens)."""

    children_names = ("shortcut", "down", "conv_dw", "norm", "mlp", "ls", "drop_path")

    def forward(self, x):
        shortcut = self.shortcut(x)
        return self.drop_path(self.ls(self.mlp(self.norm(self.conv_dw(self.down(x)))))) + shortcut


class MirrorStem(MirrorInOrder):
    """The strided 3x3, its norm-act, the second 3x3."""

    children_names = ("conv1", "norm1", "conv2")


class MirrorDownsample(MirrorInOrder):
    """A 2x2 average (or 3x3 max) pooling at stride 2, then a 1x1 widening where it has one."""

    children_names = ("pool", "expand")


class MirrorMaxxVitBlock(MirrorInOrder):
    """The conv block, the group attention block (none in MaxxViT v2), the grid attention block."""

    children_names = ("conv", "attn_block", "attn_grid")


class MirrorParallelMaxxVitBlock(MirrorInOrder):
    """Two conv blocks, then the parallel attention block."""

    children_names = ("conv", "attn")


class MirrorStage(MirrorInOrder):
    """A stage's blocks (the first strides)."""

    children_names = ("blocks",)


MAXXVIT = Family(
    name="maxxvit",
    timm_class=MaxxVit,
    mirrors={Stem: MirrorStem, MaxxVitStage: MirrorStage, Downsample2d: MirrorDownsample, MbConvBlock: MirrorMbConv,
             ConvNeXtBlock: MirrorConvNeXtBlock, TransformerBlock2d: MirrorTransformerBlock,
             MaxxVitBlock: MirrorMaxxVitBlock, ParallelMaxxVitBlock: MirrorParallelMaxxVitBlock,
             PartitionAttentionCl: MirrorPartitionAttention, PartitionAttention2d: MirrorPartitionAttention,
             ParallelPartitionAttention: MirrorParallelPartitionAttention, Mlp: MirrorMlp, ConvMlp: MirrorConvMlp,
             LayerScale: MirrorLayerScale, LayerScale2d: MirrorLayerScale},
    layout=NamedStages(("stem",), ("stages.0", "stages.1", "stages.2", "stages.3"), head=("norm",)),
    kept=("head.norm", "head.pre_logits"),
    check=CheckpointingRefused("stages"),
    input_sizes=input_sizes,
)
