"""The DaViT family (timm ``davit``: DaViT tiny .. giant, and Florence-2's image encoders
``davit_base_fl``, ``davit_huge_fl``).

Dual attention: each stage's blocks are pairs of a spatial block and a channel block. Both are
x' = cpe(x) (the input plus a depthwise 3x3 of it), x' + attention(norm(x')), then cpe again and
x + MLP(norm(x)). The spatial block attends within groups of 7x7 sites (12x12 in Florence-2's)
from the map's corner, no shift, no bias (``attention.WindowAttention``); the channel block attends
between channels with sums over each image's visible tokens (``attention.ChannelGroupAttention``).
A 7x7 stride-4 stem padded 3 with a layer norm; a layer norm and a 2x2 stride-2 convolution (a 3x3
padded 1 in Florence-2's) start each later stage. timm pads a map to whole groups and lets the
padding be keys; here it is none, so timm's features are matched on maps of whole groups (224 px
for groups of 7, 384 px for 12). timm's head norm runs on the pooled vector: kept, frozen.
"""

from __future__ import annotations

from timm.layers import Mlp
from timm.models.davit import (ChannelAttention, ChannelAttentionV2, ChannelBlock, ConvPosEnc, DaVit, DaVitStage,
                               Downsample, SpatialBlock, Stem, WindowAttention as TimmWindowAttention)
from torch import nn

from ..attention import ChannelGroupAttention, WindowAttention
from .convnext import MirrorMlp
from ..family import Family
from ..layouts import NamedStages
from ..leaves import square
from ..mirrors import Converter, MirrorChildren, MirrorDownsampleBlocks, MirrorInOrder
from ..refusals import CheckpointingRefused, unsupported


class MirrorStem(MirrorInOrder):
    """The 7x7 stride-4 convolution, then its layer norm (timm's padding to whole 4x4 blocks is
    nothing on maps of whole 32-pixel patches)."""

    children_names = ("conv", "norm")


class MirrorDownsample(MirrorInOrder):
    """The layer norm, then the strided convolution (timm's padding for an even kernel is nothing on
    maps of whole patches)."""

    children_names = ("norm", "conv")


class MirrorConvPosEnc(MirrorChildren):
    """x + act(proj(x)): a depthwise 3x3 and an optional GELU, plus the input."""

    children_names = ("proj", "act")

    def forward(self, x):
        return x + self.act(self.proj(x))


class MirrorDualBlock(MirrorChildren):
    """timm's SpatialBlock and ChannelBlock: x = cpe1(x), x + drop_path1(attn(norm1(x))), cpe2, then
    x + drop_path2(mlp(norm2(x))) where the block has its MLP."""

    children_names = ("cpe1", "norm1", "attn", "drop_path1", "cpe2", "norm2", "mlp", "drop_path2")

    def __init__(self, block: nn.Module, convert: Converter, path: str):
        if block.mlp is None:  # timm's forward then drops the attention's drop path too
            raise unsupported(block, path, "a block without its MLP (ffn=False)")
        super().__init__(block, convert, path)

    def forward(self, x):
        x = self.cpe1(x)
        x = self.cpe2(x + self.drop_path1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class MirrorWindowAttention(MirrorChildren):
    """qkv, attention within groups of ``window_size`` sites from the map's corner, proj."""

    children_names = ("qkv", "proj")

    def __init__(self, module: TimmWindowAttention, convert: Converter, path: str):
        super().__init__(module, convert, path)
        window = square(module.window_size, module, path)
        head_dim = module.dim // module.num_heads
        # parameter-free, a name timm's module lacks
        self.attention = convert.leaf(WindowAttention(module.num_heads, head_dim, head_dim, window),
                                      f"{path}.attention")

    def forward(self, x):
        return self.proj(self.attention(self.qkv(x)))


class MirrorChannelAttention(MirrorChildren):
    """qkv, the attention between channels (timm's ChannelAttention or Florence-2's V2), proj."""

    children_names = ("qkv", "proj")

    def __init__(self, module: nn.Module, convert: Converter, path: str):
        super().__init__(module, convert, path)
        v2 = isinstance(module, ChannelAttentionV2)
        heads = module.groups if v2 else module.num_heads
        attention = ChannelGroupAttention(heads, module.qkv.in_features // heads, v2, v2 and module.dynamic_scale)
        self.attention = convert.leaf(attention, f"{path}.attention")  # parameter-free, a name timm's lacks

    def forward(self, x):
        return self.proj(self.attention(self.qkv(x)))


DAVIT = Family(
    name="davit",
    timm_class=DaVit,
    mirrors={Stem: MirrorStem, Downsample: MirrorDownsample, DaVitStage: MirrorDownsampleBlocks,
             ConvPosEnc: MirrorConvPosEnc, SpatialBlock: MirrorDualBlock, ChannelBlock: MirrorDualBlock,
             TimmWindowAttention: MirrorWindowAttention, ChannelAttention: MirrorChannelAttention,
             ChannelAttentionV2: MirrorChannelAttention, Mlp: MirrorMlp},
    layout=NamedStages(("stem",), ("stages.0", "stages.1", "stages.2", "stages.3")),
    kept=("norm_pre", "head.norm", "head.pre_logits"),
    check=CheckpointingRefused("stages"),
)
