"""The NesT family (timm ``Nest``: ``nest_tiny``, ``_small``, ``_base`` and their ``_jx`` ports; "Nested
Hierarchical Transformer", AAAI 2022): three scales, strides 4, 8 and 16, so a 16-pixel mask patch.

A 4x4 stride-4 patch embedding, then per level [a block aggregation: a 3x3 convolution, a layer norm
and a 3x3 stride-2 max pooling padded by 1], a learned position embedding of the model's own map
(timm keeps it per block of sites: ``blockify`` is a permutation of the sites, so it is a table of
the map), and transformer layers whose attention stays within blocks of ``block_size`` x
``block_size`` sites laid from the map's corner (``attention.WindowAttention``: each visible token
attends to its block's visible tokens), linear MLPs, layer norms; the final layer norm ends the last
level. The coarsest stride, 16, is the mask's patch (``Family.strides``).
"""

from __future__ import annotations

from timm.layers import Mlp, PatchEmbed
from timm.models.nest import Attention, ConvPool, Nest, NestLevel, TransformerLayer, deblockify
from torch import Tensor, nn

from ..attention import AbsolutePositions, WindowAttention
from ..family import Family, normed_stage_outputs, own_input_size
from ..layouts import NamedStages
from ..mirrors import Converter, MirrorInOrder
from ..refusals import ConversionError, refuse_checkpointing, refuse_dropout
from .convnext import MirrorMlp

STRIDES = (4, 8, 16)


class MirrorAttention(nn.Module):
    """qkv, attention within each block of sites, proj."""

    def __init__(self, module: Attention, convert: Converter, path: str, block_size: int):
        super().__init__()
        refuse_dropout(module, path, "attn_drop", "proj_drop")
        head_dim = module.qkv.in_features // module.num_heads
        self.qkv = convert(module.qkv, f"{path}.qkv")
        # timm's output lays each head's channel d side by side (d * heads + h): heads_inner
        self.attention = convert.leaf(WindowAttention(module.num_heads, head_dim, head_dim, block_size,
                                                      heads_inner=True),
                                      f"{path}.attention")  # parameter-free, a name timm's module lacks
        self.proj = convert(module.proj, f"{path}.proj")

    def forward(self, x):
        return self.proj(self.attention(self.qkv(x)))


class MirrorTransformerLayer(nn.Module):
    """x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x)))."""

    def __init__(self, layer: TransformerLayer, convert: Converter, path: str, block_size: int):
        super().__init__()
        for name in ("norm1", "drop_path1", "norm2", "mlp", "drop_path2"):
            setattr(self, name, convert(getattr(layer, name), f"{path}.{name}"))
        self.attn = MirrorAttention(layer.attn, convert, f"{path}.attn", block_size)

    def forward(self, x):
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class MirrorPatchEmbed(MirrorInOrder):
    """timm's PatchEmbed of maps (NesT's: flatten=False): the 4x4 stride-4 convolution and its norm."""

    children_names = ("proj", "norm")


class MirrorConvPool(MirrorInOrder):
    """timm's block aggregation: 3x3 convolution, layer norm per site, 3x3 stride-2 max pooling."""

    children_names = ("conv", "norm", "pool")


class MirrorNestLevel(nn.Module):
    """[Block aggregation], the position table added, transformer layers within blocks of sites;
    ``pos_embed`` under timm's name, laid out as timm's (per block of sites)."""

    def __init__(self, level: NestLevel, convert: Converter, path: str):
        super().__init__()
        refuse_checkpointing(level, path)
        self.block_size = level.block_size
        self.pool = convert(level.pool, f"{path}.pool")
        self.pos_embed = nn.Parameter(level.pos_embed.detach().clone())
        self.positions = convert.leaf(AbsolutePositions(), f"{path}.positions")  # a name timm's lacks
        self.transformer_encoder = nn.Sequential(*(
            MirrorTransformerLayer(layer, convert, f"{path}.transformer_encoder.{i}", level.block_size)
            for i, layer in enumerate(level.transformer_encoder)))

    def position_table(self) -> Tensor:
        """(C, h, w): what timm adds at each site of the model's own map (its blocks put back in place)."""
        return deblockify(self.pos_embed, self.block_size)[0].permute(2, 0, 1)

    def forward(self, x):
        return self.transformer_encoder(self.positions(self.pool(x), self.position_table()))


def check(model: Nest) -> None:
    if model.patch_size != STRIDES[0]:
        raise ConversionError(f"NesT with {model.patch_size}-pixel patches: only timm's 4 (levels at strides 4, 8, 16)")


NEST = Family(
    name="nest",
    timm_class=Nest,
    mirrors={PatchEmbed: MirrorPatchEmbed, NestLevel: MirrorNestLevel, ConvPool: MirrorConvPool, Mlp: MirrorMlp},
    layout=NamedStages(("patch_embed",), ("levels.0", "levels.1", "levels.2"), head=("norm",), strides=STRIDES),
    check=check,
    features=normed_stage_outputs(Nest, "patch_embed", "levels"),  # timm's norm runs channels last
    input_sizes=own_input_size("adds position embeddings made for its own input size"),
    strides=STRIDES,
)
