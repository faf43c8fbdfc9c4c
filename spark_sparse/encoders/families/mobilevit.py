"""MobileViT's blocks (timm's ``mobilevit`` module: MobileViT xxs/xs/s and MobileViT v2 0.5 .. 2.0,
ByobNet models; the family is timm's ByobNet, byobnet.py).

A MobileViT block mixes locally with a kxk conv-norm-act and a 1x1, then globally: timm unfolds the
map into 2x2 blocks and runs transformer blocks over the sites with the same offset in their block
(v1: ViT blocks, softmax attention; v2: separable attention, a softmax over the sites of a score
weighting the keys into one context, group norms, 1x1 MLPs), folds it back, projects it by a 1x1
conv-norm and (v1) fuses it with the block's input by a kxk conv-norm-act on their concatenation.
Every op but the attention is per site, so the mirror keeps the map as it is and only the
attention groups the sites (``attention.GridAttention``, ``attention.SeparableGridAttention``): each
visible site attends to the visible sites of its image in its group. timm resizes a map of no whole
2x2 blocks (a stride-32 map of 7 at 224 px) bilinearly; that has no sparse twin and is refused in
one line when it is met: MobileViT runs at input sizes that are multiples of 64 (its own is 256).
"""

from __future__ import annotations

from timm.layers import ConvMlp, LayerScale, Mlp
from timm.layers.attention import Attention
from timm.models.mobilevit import LinearSelfAttention, LinearTransformerBlock, MobileVitBlock, MobileVitV2Block
from timm.models.vision_transformer import Block as TransformerBlock
from torch import nn

from ..attention import GridAttention, SeparableGridAttention
from .convnext import MirrorMlp
from ..family import InputSizes
from ..leaves import ChannelConcat
from ..mirrors import Converter, MirrorChildren, MirrorInOrder, MirrorLayerScale
from ..refusals import unsupported


def input_sizes(name: str) -> InputSizes:
    """Multiples of 64: the stride-32 map must be one of whole 2x2 blocks too (timm's models unfold by 2)."""
    return InputSizes(64, "unfolds its maps into 2x2 blocks of sites, at stride 32 too")


def grid_of(block: nn.Module, path: str) -> int:
    """The side of the block's unfolding patches (square only)."""
    grid, grid_w = block.patch_size
    if grid != grid_w:
        raise unsupported(block, path, f"unfolding patches of {block.patch_size} sites (not square)")
    return grid


class MirrorAttention(MirrorChildren):
    """timm's ViT attention: qkv, the attention within the block's groups of sites, proj (no q/k norm)."""

    children_names = ("qkv", "proj")
    dropouts = ("attn_drop", "proj_drop")

    def __init__(self, module: Attention, convert: Converter, path: str, grid: int):
        for name in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(module, name), nn.Identity):
                raise unsupported(getattr(module, name), f"{path}.{name}", "a norm inside the attention")
        if getattr(module, "gate", None) is not None:
            raise unsupported(module, path, "a gated attention")
        super().__init__(module, convert, path)
        # parameter-free, a name timm's module lacks
        self.attention = convert.leaf(GridAttention(module.num_heads, module.head_dim, grid), f"{path}.attention")

    def forward(self, x):
        return self.proj(self.attention(self.qkv(x)))


class MirrorTransformerBlock(MirrorChildren):
    """timm's ViT block: x + drop_path1(ls1(attn(norm1(x)))), then x + drop_path2(ls2(mlp(norm2(x))))."""

    children_names = ("norm1", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")

    def __init__(self, block: TransformerBlock, convert: Converter, path: str, grid: int):
        super().__init__(block, convert, path)
        self.attn = MirrorAttention(block.attn, convert, f"{path}.attn", grid)

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class MirrorLinearSelfAttention(MirrorChildren):
    """qkv_proj (a 1x1 to a score, keys and values), the separable attention, out_proj."""

    children_names = ("qkv_proj", "out_proj")
    dropouts = ("attn_drop", "out_drop")

    def __init__(self, module: LinearSelfAttention, convert: Converter, path: str, grid: int):
        super().__init__(module, convert, path)
        # parameter-free, a name timm's module lacks
        self.attention = convert.leaf(SeparableGridAttention(module.embed_dim, grid), f"{path}.attention")

    def forward(self, x):
        return self.out_proj(self.attention(self.qkv_proj(x)))


class MirrorLinearTransformerBlock(MirrorChildren):
    """x + drop_path1(attn(norm1(x))), then x + drop_path2(mlp(norm2(x))) (group norms of one group)."""

    children_names = ("norm1", "drop_path1", "norm2", "mlp", "drop_path2")

    def __init__(self, block: LinearTransformerBlock, convert: Converter, path: str, grid: int):
        super().__init__(block, convert, path)
        self.attn = MirrorLinearSelfAttention(block.attn, convert, f"{path}.attn", grid)

    def forward(self, x):
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class MirrorMobileVitBlock(MirrorChildren):
    """conv_kxk, conv_1x1, the transformer blocks and their norm on the map itself (only their
    attention groups the sites), conv_proj, then conv_fusion of [input, output] where the block has it."""

    children_names = ("conv_kxk", "conv_1x1", "norm", "conv_proj", "conv_fusion")
    transformer_mirror: type[nn.Module] = MirrorTransformerBlock

    def __init__(self, block: nn.Module, convert: Converter, path: str):
        super().__init__(block, convert, path)
        grid = grid_of(block, path)
        self.transformer = nn.Sequential(*(self.transformer_mirror(b, convert, f"{path}.transformer.{i}", grid)
                                           for i, b in enumerate(block.transformer)))
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat")  # parameter-free, a name timm's lacks

    def forward(self, x):
        y = self.conv_proj(self.norm(self.transformer(self.conv_1x1(self.conv_kxk(x)))))
        return y if self.conv_fusion is None else self.conv_fusion(self.concat(x, y))


class MirrorMobileVitV2Block(MirrorMobileVitBlock):
    """MobileViT v2's: the same without the fusion, separable attention in its transformer blocks."""

    transformer_mirror = MirrorLinearTransformerBlock


class MirrorConvMlp(MirrorInOrder):
    """timm's ConvMlp: fc1, [norm], act, fc2 (1x1 convolutions; dropout refused unless zero)."""

    children_names = ("fc1", "norm", "act", "fc2")
    dropouts = ("drop",)


MIRRORS = {MobileVitBlock: MirrorMobileVitBlock, MobileVitV2Block: MirrorMobileVitV2Block, ConvMlp: MirrorConvMlp,
           Mlp: MirrorMlp, LayerScale: MirrorLayerScale}
