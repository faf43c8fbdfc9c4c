"""The Twins family (timm ``twins``: Twins-PCPVT ``twins_pcpvt_small`` .. ``_large`` and Twins-SVT
``twins_svt_small`` .. ``_large``).

Each stage is a patch embedding (a 4x4 stride-4, then 2x2 stride-2, convolution and a layer norm),
then blocks as PVT v2's (x + attention(norm1(x)), then x + MLP(norm2(x)), the MLP timm's plain one),
the first followed by a position encoding generator (PEG: the input plus a depthwise 3x3 of it).
The last stage's output goes through the final layer norm. No stage module holds a stage: the
model runs its four lists (``patch_embeds``, ``blocks``, ``pos_block``) side by side, as
``twins_features`` does on the converted body.

PCPVT's attention is PVT v2's spatial-reduction attention (``pvt_v2.MirrorAttention``: keys one per
visible 32-pixel patch). SVT's blocks alternate it with locally-grouped attention
(``attention.WindowAttention``): groups of 7x7 sites from the map's top-left corner (28 pixels at
stride 4, which straddle the mask's patches), each visible token attending to its group's visible
tokens; the sparse engine scatters the rows into their groups' slots.
"""

from __future__ import annotations

from timm.layers import Mlp
from timm.models.twins import Block, GlobalSubSampleAttn, LocallyGroupedAttn, PatchEmbed, PosConv, Twins
from torch import nn

from ..attention import WindowAttention
from .convnext import MirrorMlp
from ..family import Family
from ..layouts import Layout, check_strides
from ..mirrors import Converter, MirrorChildren, MirrorInOrder
from ..refusals import ConversionError, refuse_dropout
from .hrnet import mirror_module_list
from .pvt_v2 import MirrorAttention, MirrorBlock


class MirrorPatchEmbed(MirrorInOrder):
    """A stage's patchify convolution, then its layer norm."""

    children_names = ("proj", "norm")


class MirrorPosConv(MirrorChildren):
    """The position encoding generator: a depthwise 3x3 (timm's ``proj``, a Sequential), plus its
    input where it keeps the stride."""

    children_names = ("proj",)

    def __init__(self, module: PosConv, convert: Converter, path: str):
        super().__init__(module, convert, path)
        self.residual = module.stride == 1

    def forward(self, x):
        y = self.proj(x)
        return y + x if self.residual else y


class MirrorLocallyGroupedAttn(nn.Module):
    """qkv, attention within each 7x7 group of sites, proj."""

    def __init__(self, module: LocallyGroupedAttn, convert: Converter, path: str):
        super().__init__()
        refuse_dropout(module, path, "attn_drop", "proj_drop")
        self.qkv = convert(module.qkv, f"{path}.qkv")
        # parameter-free, a name timm's module lacks
        dim = module.dim // module.num_heads
        self.attention = convert.leaf(WindowAttention(module.num_heads, dim, dim, module.ws), f"{path}.attention")
        self.proj = convert(module.proj, f"{path}.proj")

    def forward(self, x):
        return self.proj(self.attention(self.qkv(x)))


def twins_features(net: nn.Module, x) -> list:
    """The four stages' outputs, the last through the final norm: timm's ``forward_intermediates``
    on a timm Twins, its flow on the converted body (the same names)."""
    if isinstance(net, Twins):
        return net.forward_intermediates(x, norm=True, intermediates_only=True)
    feats = []
    for embed, blocks, peg in zip(net.patch_embeds, net.blocks, net.pos_block):
        x = peg(blocks[0](embed(x)))  # timm's PEG runs after each stage's first block
        for block in blocks[1:]:
            x = block(x)
        feats.append(x)
    feats[-1] = net.norm(feats[-1])
    return feats


def twins_layout(model: Twins) -> Layout:
    """Every module the features use, stage by stage."""
    if len(model.blocks) != 4:
        raise ConversionError(f"Twins with {len(model.blocks)} stages: the encoder takes four")
    check_strides(model, [info["reduction"] for info in model.feature_info])
    stages = tuple((f"patch_embeds.{i}", f"blocks.{i}", f"pos_block.{i}") for i in range(4))
    stages = stages[:3] + (stages[3] + ("norm",),)
    return Layout((), stages, tuple(model.embed_dims))


def refuse_position_dropout(model: Twins) -> None:
    """timm's dropout after each patch embedding (``pos_drop_rate``) is not mirrored."""
    refuse_dropout(model.pos_drops, "pos_drops", *(str(i) for i in range(len(model.pos_drops))))


TWINS = Family(
    name="twins",
    timm_class=Twins,
    mirrors={PatchEmbed: MirrorPatchEmbed, Block: MirrorBlock, GlobalSubSampleAttn: MirrorAttention,
             LocallyGroupedAttn: MirrorLocallyGroupedAttn, PosConv: MirrorPosConv, Mlp: MirrorMlp,
             nn.ModuleList: mirror_module_list},
    layout=twins_layout,
    check=refuse_position_dropout,
    features=twins_features,
)
