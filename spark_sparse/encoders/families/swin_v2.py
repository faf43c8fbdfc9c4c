"""The Swin Transformer V2 family (timm ``swin_transformer_v2``: ``swinv2_tiny_window8_256`` ..
``swinv2_large_window12to24_192to384``; SimMIM's masked-image-modelling backbone).

Swin's shape (``swin.py``) with three changes. The attention is cosine attention: the cosine of
each query and key times a learned per-head scale (clamped at 100), plus ``16 sigmoid`` of a bias
that a small MLP (``cpb_mlp``) makes from log-spaced relative offsets; q and v carry learned biases
(``q_bias``, ``v_bias``; k's is zero) beside a bias-free projection. Blocks normalise after the
attention and the MLP: x + norm1(attention(x)), then x + norm2(MLP(x)). Patch merging reduces,
then normalises. Each visible token attends to its group's visible tokens, within shifted and
unshifted groups as in Swin (``attention.WindowAttention`` with ``shift`` and ``logit_scale``); the
bias MLP runs on its fixed table of offsets, not on features, so it stays timm's module.
"""

from __future__ import annotations

import copy
import math

import torch
from timm.layers import Mlp, PatchEmbed
from timm.models.swin_transformer_v2 import (PatchMerging, SwinTransformerV2, SwinTransformerV2Block,
                                             SwinTransformerV2Stage, WindowAttention as TimmWindowAttention)
from torch import nn

from ..attention import WindowAttention
from .convnext import MirrorMlp
from ..family import Family
from ..layouts import NamedStages
from ..leaves import ColumnsFirstSpaceToDepth
from ..mirrors import Converter, MirrorChildren, MirrorDownsampleBlocks
from ..refusals import CheckpointingRefused
from .swin import MirrorPatchEmbed, MirrorSwinBlock


class MirrorPatchMerging(MirrorChildren):
    """Each 2x2 block of sites into channels (column offset first, as timm orders them), the linear
    reduction, then the layer norm."""

    children_names = ("reduction", "norm")

    def __init__(self, module: PatchMerging, convert: Converter, path: str):
        super().__init__(module, convert, path)
        # parameter-free, a name timm's module lacks
        self.merge = convert.leaf(ColumnsFirstSpaceToDepth(2), f"{path}.merge")

    def forward(self, x):
        return self.norm(self.reduction(self.merge(x)))


class MirrorWindowAttention(MirrorChildren):
    """qkv (and the q, k, v bias), cosine attention within the block's groups of sites plus
    ``16 sigmoid`` of the bias ``cpb_mlp`` makes per relative offset, proj; timm's names kept, its
    non-persistent tables too."""

    children_names = ("qkv", "proj")
    dropouts = ("attn_drop", "proj_drop")

    def __init__(self, module: TimmWindowAttention, convert: Converter, path: str, shift: int):
        super().__init__(module, convert, path)
        window = module.window_size[0]
        self.logit_scale = nn.Parameter(module.logit_scale.detach().clone())
        self.cpb_mlp = copy.deepcopy(module.cpb_mlp)  # on the offsets' table: timm's own module
        self.q_bias = self.v_bias = None
        if module.q_bias is not None:
            self.q_bias = nn.Parameter(module.q_bias.detach().clone())
            self.v_bias = nn.Parameter(module.v_bias.detach().clone())
            self.register_buffer("k_bias", module.k_bias.clone(), persistent=False)
        self.register_buffer("relative_coords_table", module.relative_coords_table.clone(), persistent=False)
        self.register_buffer("relative_position_index", module.relative_position_index.clone(), persistent=False)
        heads = module.num_heads
        head_dim = module.qkv.out_features // 3 // heads
        # parameter-free, a name timm's module lacks
        self.attention = convert.leaf(WindowAttention(heads, head_dim, head_dim, window, shift=shift),
                                      f"{path}.attention")

    def forward(self, x):
        area = self.attention.window ** 2
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.attention.num_heads)
        bias = 16 * torch.sigmoid(table[self.relative_position_index.view(-1)].view(area, area, -1).permute(2, 0, 1))
        qkv_bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
        scale = self.logit_scale.clamp(max=math.log(100)).exp()
        return self.proj(self.attention(self.qkv(x), bias, qkv_bias=qkv_bias, logit_scale=scale))


class MirrorSwinV2Block(MirrorSwinBlock):
    """x + drop_path1(norm1(attn(x))), then x + drop_path2(norm2(mlp(x))); the attention's groups
    are the block's, as in Swin."""

    attention_mirror = MirrorWindowAttention

    def forward(self, x):
        x = x + self.drop_path1(self.norm1(self.attn(x)))
        return x + self.drop_path2(self.norm2(self.mlp(x)))


SWIN_V2 = Family(
    name="swin_transformer_v2",
    timm_class=SwinTransformerV2,
    mirrors={PatchEmbed: MirrorPatchEmbed, SwinTransformerV2Stage: MirrorDownsampleBlocks,
             PatchMerging: MirrorPatchMerging, SwinTransformerV2Block: MirrorSwinV2Block, Mlp: MirrorMlp},
    layout=NamedStages(("patch_embed",), ("layers.0", "layers.1", "layers.2", "layers.3"), head=("norm",)),
    check=CheckpointingRefused("layers"),
    channels_last=True,
)
