"""The Swin Transformer family (timm ``swin_transformer``: ``swin_tiny_patch4_window7_224`` ..
``swin_large_patch4_window12_384`` and the AutoFormerV2 ``swin_s3_*`` models).

A 4x4 stride-4 patch embedding with a layer norm is the stem; each later stage begins with patch
merging (each 2x2 block of sites into one site's channels, a layer norm, a linear reduction) and
every stage holds Swin blocks: x + attention(norm1(x)), then x + MLP(norm2(x)). The last stage's
output goes through the final layer norm. timm keeps every map channels last; the engines do not.

The attention runs within groups of ``window`` x ``window`` sites with a learned bias per head and
relative offset (``relative_position_bias_table``, timm's name), every other block's groups shifted
by half a window. timm shifts by a cyclic roll and masks the pairs of sites the roll brought
together; that is attention within groups whose grid starts ``shift`` sites in from the map's
top-left corner, the sites before it in groups of their own (``attention.WindowAttention`` with
``shift``). Each visible token attends to its group's visible tokens; groups of 7 at stride 4 are 28
pixels and straddle the mask's patches, so the sparse engine scatters the rows into their groups'
slots (where one unshifted group holds a whole image, as at stride 32 for 224 px, it attends over
the visible rows alone). timm pads a map to whole groups and lets the padding be keys;
here it is none, so timm's features are matched on maps of whole groups (224 px, 384 px for the
window-12 models).
"""

from __future__ import annotations

from timm.layers import Mlp, PatchEmbed
from timm.models.swin_transformer import (PatchMerging, SwinTransformer, SwinTransformerBlock, SwinTransformerStage,
                                          WindowAttention as TimmWindowAttention)
from torch import nn

from ..attention import WindowAttention
from .convnext import MirrorMlp
from ..family import Family
from ..layouts import NamedStages
from ..leaves import ColumnsFirstSpaceToDepth
from ..mirrors import Converter, MirrorChildren, MirrorDownsampleBlocks, MirrorInOrder
from ..refusals import CheckpointingRefused, unsupported


class MirrorPatchEmbed(MirrorInOrder):
    """The patchify convolution, then its layer norm (or none)."""

    children_names = ("proj", "norm")


class MirrorPatchMerging(MirrorChildren):
    """Each 2x2 block of sites into channels (column offset first, as timm orders them), the layer
    norm over them, the linear reduction."""

    children_names = ("norm", "reduction")

    def __init__(self, module: PatchMerging, convert: Converter, path: str):
        super().__init__(module, convert, path)
        # parameter-free, a name timm's module lacks
        self.merge = convert.leaf(ColumnsFirstSpaceToDepth(2), f"{path}.merge")

    def forward(self, x):
        return self.reduction(self.norm(self.merge(x)))


class MirrorWindowAttention(MirrorChildren):
    """qkv, attention within the block's groups of sites with the bias of each pair's relative
    offset, proj; ``relative_position_bias_table`` keeps timm's name (its index, timm's too, is no
    part of the state dict)."""

    children_names = ("qkv", "proj")
    dropouts = ("attn_drop", "proj_drop")

    def __init__(self, module: TimmWindowAttention, convert: Converter, path: str, shift: int):
        super().__init__(module, convert, path)
        window = module.window_size[0]
        self.relative_position_bias_table = nn.Parameter(module.relative_position_bias_table.detach().clone())
        self.register_buffer("relative_position_index", module.relative_position_index.clone(), persistent=False)
        head_dim = module.qkv.out_features // 3 // module.num_heads
        # parameter-free, a name timm's module lacks
        self.attention = convert.leaf(WindowAttention(module.num_heads, head_dim, head_dim, window, shift=shift),
                                      f"{path}.attention")

    def forward(self, x):
        area = self.attention.window ** 2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(area, area, -1)
        return self.proj(self.attention(self.qkv(x), bias.permute(2, 0, 1)))


class MirrorSwinBlock(MirrorChildren):
    """x + drop_path1(attn(norm1(x))), then x + drop_path2(mlp(norm2(x))); the attention's groups
    are the block's (``window_size``, ``shift_size``: timm fits them to the map it was built for)."""

    children_names = ("norm1", "drop_path1", "norm2", "mlp", "drop_path2")
    attention_mirror: type[nn.Module] = MirrorWindowAttention

    def __init__(self, block: SwinTransformerBlock, convert: Converter, path: str):
        super().__init__(block, convert, path)
        (window, window_w), (shift, shift_w) = block.window_size, block.shift_size
        if (window, shift) != (window_w, shift_w):
            raise unsupported(block, path, f"a {block.window_size} window shifted {block.shift_size} (not square)")
        self.attn = self.attention_mirror(block.attn, convert, f"{path}.attn", shift)

    def forward(self, x):
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


SWIN = Family(
    name="swin_transformer",
    timm_class=SwinTransformer,
    mirrors={PatchEmbed: MirrorPatchEmbed, SwinTransformerStage: MirrorDownsampleBlocks,
             PatchMerging: MirrorPatchMerging, SwinTransformerBlock: MirrorSwinBlock, Mlp: MirrorMlp},
    layout=NamedStages(("patch_embed",), ("layers.0", "layers.1", "layers.2", "layers.3"), head=("norm",)),
    check=CheckpointingRefused("layers"),
    channels_last=True,
)
