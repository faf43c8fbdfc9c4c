"""Swin Transformer V2 as Christoph Reich wrote it for timm (``swin_transformer_v2_cr``:
``swinv2_cr_tiny_224`` .. ``swinv2_cr_giant_384``, the ``_ns`` models with a norm ending each stage).

Swin V2's attention (``swin_v2.py``) in its own modules: cosine attention within shifted and
unshifted groups of sites, a learned per-head scale (clamped at 100), q, k, v projected with biases,
and a bias per pair of sites in a group that an MLP (``meta_mlp``) makes from their log-spaced
offset. That MLP has a dropout of its own (timm's 0.125, fixed): in train mode each pair's bias is
drawn anew, so the mirror keeps timm's module and runs it once per block as timm does, and from the
same random state both engines and timm draw the same biases. Blocks normalise after the attention
and the MLP, and some blocks normalise their output too (``norm3``: every sixth in the huge and giant
models, the last of each stage in the ``_ns`` ones, the model's last always). Stages are NCHW
between them; the first has no patch merging, the others merge as Swin V1 does (a layer norm, then
the reduction).
"""

from __future__ import annotations

import copy
import math

from timm.layers import Mlp
from timm.models.swin_transformer_v2_cr import (PatchEmbed, PatchMerging, SwinTransformerV2Cr,
                                                SwinTransformerV2CrBlock, SwinTransformerV2CrStage,
                                                WindowMultiHeadAttention)
from torch import nn

from ..attention import WindowAttention
from .convnext import MirrorMlp
from ..family import Family
from ..layouts import NamedStages
from ..mirrors import Converter, MirrorChildren, MirrorDownsampleBlocks
from ..refusals import CheckpointingRefused
from .swin import MirrorPatchEmbed, MirrorPatchMerging, MirrorSwinBlock


class MirrorWindowMultiHeadAttention(MirrorChildren):
    """qkv, cosine attention within the block's groups of sites plus ``meta_mlp``'s bias for each
    pair (timm's module on timm's table of log-spaced offsets), proj."""

    children_names = ("qkv", "proj")
    dropouts = ("attn_drop", "proj_drop")

    def __init__(self, module: WindowMultiHeadAttention, convert: Converter, path: str, shift: int):
        super().__init__(module, convert, path)
        self.logit_scale = nn.Parameter(module.logit_scale.detach().clone())
        self.meta_mlp = copy.deepcopy(module.meta_mlp)  # on the offsets' table, its dropout timm's
        self.register_buffer("relative_coordinates_log", module.relative_coordinates_log.clone(), persistent=False)
        heads = module.num_heads
        head_dim = module.in_features // heads
        # parameter-free, a name timm's module lacks
        self.attention = convert.leaf(WindowAttention(heads, head_dim, head_dim, module.window_size[0], shift=shift),
                                      f"{path}.attention")

    def forward(self, x):
        area, heads = self.attention.window ** 2, self.attention.num_heads
        bias = self.meta_mlp(self.relative_coordinates_log).transpose(0, 1).reshape(heads, area, area)
        scale = self.logit_scale.view(heads, 1, 1).clamp(max=math.log(100)).exp()
        return self.proj(self.attention(self.qkv(x), bias, logit_scale=scale))


class MirrorSwinV2CrBlock(MirrorSwinBlock):
    """x + drop_path1(norm1(attn(x))), then x + drop_path2(norm2(mlp(x))), then norm3 (an identity
    in most blocks); the attention's groups are the block's, as in Swin."""

    children_names = MirrorSwinBlock.children_names + ("norm3",)
    attention_mirror = MirrorWindowMultiHeadAttention

    def forward(self, x):
        x = x + self.drop_path1(self.norm1(self.attn(x)))
        return self.norm3(x + self.drop_path2(self.norm2(self.mlp(x))))


SWIN_V2_CR = Family(
    name="swin_transformer_v2_cr",
    timm_class=SwinTransformerV2Cr,
    mirrors={PatchEmbed: MirrorPatchEmbed, SwinTransformerV2CrStage: MirrorDownsampleBlocks,
             PatchMerging: MirrorPatchMerging, SwinTransformerV2CrBlock: MirrorSwinV2CrBlock, Mlp: MirrorMlp},
    layout=NamedStages(("patch_embed",), ("stages.0", "stages.1", "stages.2", "stages.3")),
    check=CheckpointingRefused("stages"),
)
