"""The PVT v2 family (timm ``pvt_v2``: Pyramid Vision Transformer v2, ``pvt_v2_b0`` .. ``_b5``).

An overlapping patch embedding (a 7x7 stride-4 convolution padded 3, then a layer norm) is the
stem; each later stage begins with another (3x3, stride 2) and ends with a layer norm. A block is
x + attention(norm1(x)), then x + MLP(norm2(x)), the MLP a linear layer, a depthwise 3x3, GELU, a
linear layer (no position embedding: the depthwise convolution is the position code).

The attention is spatial-reduction attention: every token is a query, and the keys and values are
made from a coarser map, a convolution whose kernel is its stride (``sr_ratio``: 8, 4, 2 at strides
4, 8, 16), then a layer norm; at stride 32 the tokens themselves. Each key so covers exactly one of
the mask's 32-pixel patches: a visible patch's key sees visible pixels only, and each visible query
attends to its image's visible keys (``attention.GroupedQueryAttention``, a key and value head per
query head), as MAE's encoder would. The linear variant (``pvt_v2_b2_li``) pools the whole map to
7x7 cells first (then a 1x1, the layer norm and GELU): at its own input size, 224 px, one cell per
32-pixel patch, a visible patch's key its sites' mean; it runs at that size alone.
"""

from __future__ import annotations

from timm.models.pvt_v2 import (Attention, Block, MlpWithDepthwiseConv, OverlapPatchEmbed,
                                PyramidVisionTransformerStage, PyramidVisionTransformerV2)
from torch import nn

from ..attention import GroupedQueryAttention
from ..family import Family, InputSizes, meta_model, own_input_size
from ..layouts import NamedStages
from ..leaves import ChannelSplit
from ..mirrors import Converter, MirrorChildren, MirrorInOrder
from ..refusals import CheckpointingRefused


class MirrorPatchEmbed(MirrorInOrder):
    """The overlapping patch embedding: its strided convolution, then its layer norm."""

    children_names = ("proj", "norm")


class MirrorMlp(MirrorInOrder):
    """fc1, [ReLU: the linear variant's], the depthwise 3x3, GELU, fc2 (dropout 0)."""

    children_names = ("fc1", "relu", "dwconv", "act", "fc2")
    dropouts = ("drop",)


class MirrorAttention(MirrorChildren):
    """Queries from every token, keys and values from the reduced map (``sr`` then ``norm``, or
    the tokens where the stage has no reduction), attended per head, projected (PVT v2's
    attention, and Twins' global sub-sampled attention, the same)."""

    children_names = ("q", "kv", "pool", "sr", "norm", "act", "proj")
    dropouts = ("attn_drop", "proj_drop")

    def __init__(self, module: nn.Module, convert: Converter, path: str):
        super().__init__(module, convert, path)
        # parameter-free, names timm's module lacks
        self.split = convert.leaf(ChannelSplit(module.dim), f"{path}.split")
        heads, dim = module.num_heads, module.dim // module.num_heads
        self.attention = convert.leaf(GroupedQueryAttention(heads, dim, dim, kv_heads=heads), f"{path}.attention")

    def forward(self, x):
        if self.pool is not None:  # the linear variant's
            reduced = self.act(self.norm(self.sr(self.pool(x))))
        else:
            reduced = x if self.sr is None else self.norm(self.sr(x))
        k, v = self.split(self.kv(reduced))
        return self.proj(self.attention(self.q(x), k, v))


class MirrorBlock(MirrorChildren):
    """x + drop_path1(attn(norm1(x))), then x + drop_path2(mlp(norm2(x))) (Twins' blocks alike)."""

    children_names = ("norm1", "attn", "drop_path1", "norm2", "mlp", "drop_path2")

    def forward(self, x):
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class MirrorStage(nn.Module):
    """The patch embedding (none in the first stage), the blocks, the layer norm."""

    def __init__(self, stage: PyramidVisionTransformerStage, convert: Converter, path: str):
        super().__init__()
        self.downsample = convert(stage.downsample, f"{path}.downsample")
        # timm's blocks are a ModuleList, each called with the map's size: a Sequential of the same names
        self.blocks = convert(nn.Sequential(*stage.blocks), f"{path}.blocks")
        self.norm = convert(stage.norm, f"{path}.norm")

    def forward(self, x):
        if self.downsample is not None:
            x = self.downsample(x)
        return self.norm(self.blocks(x))


def input_sizes(name: str) -> InputSizes:
    """Any whole number of patches, but the linear variant's own (its keys' 7x7 cells are patches there)."""
    model = meta_model(name)
    if any(isinstance(m, Attention) and m.pool is not None for m in model.modules()):  # pvt_v2_b2_li
        return own_input_size("pools its keys to 7x7 cells, one per patch at its own input size")(name)
    return InputSizes()


PVT_V2 = Family(
    name="pvt_v2",
    timm_class=PyramidVisionTransformerV2,
    mirrors={OverlapPatchEmbed: MirrorPatchEmbed, PyramidVisionTransformerStage: MirrorStage, Block: MirrorBlock,
             Attention: MirrorAttention, MlpWithDepthwiseConv: MirrorMlp},
    layout=NamedStages(("patch_embed",), ("stages.0", "stages.1", "stages.2", "stages.3")),
    check=CheckpointingRefused("stages"),
    input_sizes=input_sizes,
)
