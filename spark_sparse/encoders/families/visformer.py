"""The Visformer family (timm ``Visformer``: ``visformer_tiny``, ``visformer_small``; "Visformer: The
Vision-friendly Transformer", ICCV 2021): a family of three scales, strides 8, 16 and 32.

A 7x7 stride-2 stem (convolution, batch norm, ReLU), then per stage a patch embedding (a 4x4
stride-4 convolution to stride 8, 2x2 stride-2 ones after; a batch norm) plus a learned position
embedding made for the model's own input size, then blocks: [batch norm, attention over the image
(a 1x1 convolution to each head's q, k and v, softmax attention, a 1x1 projection), drop path,
+ the input], batch norm, a 1x1 MLP with GELU (a grouped 3x3 inside in the first stage), drop
path, + the input. The final batch norm ends the last stage. Each visible token attends to the
visible tokens of its image only (``attention.GroupedQueryAttention``). The first stage sits at
stride 8, so the encoder outputs three scales and SparK's decoder takes three (``Family.strides``).
"""

from __future__ import annotations

from timm.layers import PatchEmbed
from timm.layers.format import Format
from timm.models.visformer import Attention, Block, SpatialMlp, Visformer
from torch import Tensor, nn

from ..attention import AbsolutePositions, GroupedQueryAttention
from ..family import Family, own_input_size
from ..layouts import Layout, check_strides
from ..leaves import ChannelSplit
from ..mirrors import Converter
from ..refusals import ConversionError, refuse_checkpointing, refuse_dropout, unsupported

STRIDES = (8, 16, 32)
STAGES = (1, 2, 3)


class MirrorPatchEmbed(nn.Module):
    """timm's PatchEmbed of maps (``proj``, ``norm``), then the stage's position table added, where
    the model has one."""

    def __init__(self, module: PatchEmbed, convert: Converter, path: str):
        super().__init__()
        if module.flatten or module.output_fmt != Format.NCHW or module.dynamic_img_pad:
            raise unsupported(module, path, "only a patch embedding of maps (flatten=False, NCHW, no padding)")
        self.proj = convert(module.proj, f"{path}.proj")
        self.norm = convert(module.norm, f"{path}.norm")
        self.positions = convert.leaf(AbsolutePositions(), f"{path}.positions")  # a name timm's lacks

    def forward(self, x, table: Tensor | None = None):
        x = self.norm(self.proj(x))
        return x if table is None else self.positions(x, table)


class MirrorAttention(nn.Module):
    """timm's Attention: a 1x1 convolution to q, k and v (each head after head), each visible query
    attending to its image's visible keys, a 1x1 projection."""

    def __init__(self, module: Attention, convert: Converter, path: str):
        super().__init__()
        refuse_dropout(module, path, "attn_drop", "proj_drop")
        width = module.num_heads * module.head_dim
        self.qkv = convert(module.qkv, f"{path}.qkv")
        # parameter-free leaves under names timm's module lacks
        self.split_q = convert.leaf(ChannelSplit(width), f"{path}.split_q")
        self.split_kv = convert.leaf(ChannelSplit(width), f"{path}.split_kv")
        self.attention = convert.leaf(GroupedQueryAttention(module.num_heads, module.head_dim, module.head_dim,
                                                            module.num_heads), f"{path}.attention")
        self.proj = convert(module.proj, f"{path}.proj")

    def forward(self, x):
        q, kv = self.split_q(self.qkv(x))
        return self.proj(self.attention(q, *self.split_kv(kv)))


class MirrorSpatialMlp(nn.Module):
    """timm's SpatialMlp: 1x1, GELU, [grouped 3x3, GELU], 1x1."""

    def __init__(self, module: SpatialMlp, convert: Converter, path: str):
        super().__init__()
        refuse_dropout(module, path, "drop1", "drop3")
        for name in ("conv1", "act1", "conv2", "act2", "conv3"):
            setattr(self, name, convert(getattr(module, name), f"{path}.{name}"))

    def forward(self, x):
        x = self.act1(self.conv1(x))
        if self.conv2 is not None:
            x = self.act2(self.conv2(x))
        return self.conv3(x)


class MirrorBlock(nn.Module):
    """timm's Block: [x + drop_path(attn(norm1(x)))], then x + drop_path(mlp(norm2(x)))."""

    def __init__(self, block: Block, convert: Converter, path: str):
        super().__init__()
        for name in ("norm1", "attn", "norm2", "mlp", "drop_path"):
            setattr(self, name, convert(getattr(block, name), f"{path}.{name}"))

    def forward(self, x):
        if self.attn is not None:
            x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def layout(model: Visformer) -> Layout:
    if model.vit_stem:
        raise ConversionError("Visformer with a ViT stem (vit_stem=True) is not mirrored: its stages all sit at "
                              "stride 16, a single scale")
    check_strides(model, [info["reduction"] for info in model.feature_info], STRIDES)
    stages = tuple((f"patch_embed{i}", f"stage{i}") for i in STAGES)
    return Layout(("stem",) if model.stem is not None else (), stages[:-1] + (stages[-1] + ("norm",),),
                  tuple(info["num_chs"] for info in model.feature_info))


def visformer_features(net: nn.Module, x) -> list:
    """The three stages' outputs, the last through the final norm: timm's ``forward_intermediates``
    on a timm Visformer, the same flow on the converted body (timm's names), each stage's position
    table handed to its patch embedding."""
    if isinstance(net, Visformer):
        return net.forward_intermediates(x, norm=True, intermediates_only=True)
    if "stem" in net:  # (absent with init_channels=None: the first patch embedding on the pixels)
        x = net.stem(x)
    feats = []
    for i in STAGES:
        table = getattr(net, f"pos_embed{i}", None)
        x = net[f"stage{i}"](net[f"patch_embed{i}"](x, None if table is None else table[0]))
        feats.append(x)
    feats[-1] = net.norm(x)
    return feats


def check(model: Visformer) -> None:
    """A patch embedding per stage (timm's models; with or without the convolution stem before the
    first), no dropout after the position embeddings, no gradient checkpointing."""
    refuse_checkpointing(model, "stage1")
    if model.use_pos_embed and model.pos_drop.p > 0:  # after each position embedding
        raise unsupported(model.pos_drop, "pos_drop", f"dropout p={model.pos_drop.p}")


VISFORMER = Family(
    name="visformer",
    timm_class=Visformer,
    mirrors={PatchEmbed: MirrorPatchEmbed, Attention: MirrorAttention, SpatialMlp: MirrorSpatialMlp,
             Block: MirrorBlock},
    layout=layout,
    check=check,
    features=visformer_features,
    input_sizes=own_input_size("adds position embeddings made for its own input size"),
    parameters=("pos_embed1", "pos_embed2", "pos_embed3"),
    strides=STRIDES,
)
