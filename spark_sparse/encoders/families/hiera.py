"""The Hiera family (timm ``hiera``: Hiera tiny .. huge at 224 px, the ``abswin`` ones at 256 px).

A 7x7 stride-4 patch embedding plus a learned position embedding (absolute, made for the model's
own input size; ``abswin``: a global table resized bicubically plus the mask unit's own, tiled),
then transformer blocks: x + attention(norm1(x)), x + MLP(norm2(x)). A stage's first block
projects the normed input to its wider channels and max-pools it and the attention's queries over
2x2 sites. The first two stages (and the third's first block) attend within mask units, 8x8 sites
at stride 4: Hiera's mask unit is the mask's 32-pixel patch at every stride, so each visible
query attends to its own patch's keys (``attention.MaskUnitAttention``); the later blocks attend
over each image's visible tokens. timm runs the tokens "unrolled" (its order makes the pooling a
reshape) and rerolls the features; here every map keeps its sites, and the pooling is a 2x2 max.

The position embedding is absolute over the whole map, so an image in a larger canvas is another
input (in timm too): Hiera keeps batch independence, not canvas invariance, and runs at its own
input size alone, as timm does.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from timm.layers import LayerScale, Mlp
from timm.models.hiera import Hiera, HieraBlock, MaskUnitAttention as TimmMaskUnitAttention, PatchEmbed, Unroll
from torch import Tensor, nn

from ..attention import AbsolutePositions, MaskUnitAttention
from .convnext import MirrorMlp
from ..family import Family, own_input_size
from ..layouts import Layout, check_strides
from ..leaves import ChannelConcat, ChannelSplit
from ..mirrors import Converter, MirrorLayerScale
from ..refusals import CheckpointingRefused, ConversionError, unsupported
from .hrnet import mirror_module_list

# timm's defaults, the only ones whose mask unit is the mask's patch at every stride
MASK_UNIT, PATCH_STRIDE, Q_STRIDE = (8, 8), (4, 4), (2, 2)


class MirrorPatchEmbed(nn.Module):
    """The 7x7 stride-4 convolution (``proj``), then the position embedding's table added."""

    def __init__(self, module: PatchEmbed, convert: Converter, path: str):
        super().__init__()
        self.proj = convert(module.proj, f"{path}.proj")
        self.positions = convert.leaf(AbsolutePositions(), f"{path}.positions")  # a name timm's lacks

    def forward(self, x, table: Tensor):
        return self.positions(self.proj(x), table)


class MirrorUnroll(nn.Module):
    """The size of the model's own token map (timm's ``Unroll`` reorders the tokens of that map so
    that its poolings are reshapes; here the maps keep their sites, and this is all it holds)."""

    def __init__(self, module: Unroll, convert: Converter, path: str):
        super().__init__()
        self.size = tuple(module.size)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class PooledQueryAttention(nn.Module):
    """qkv split into q, k and v (each head after head), q max-pooled over 2x2 sites where the block
    pools (``q_pool``), an attention leaf, proj: Hiera's and SAM 2's attention mirrors."""

    def __init__(self, qkv: nn.Module, dim_out: int, q_pool: nn.Module | None, attention: nn.Module,
                 proj: nn.Module, convert: Converter, path: str):
        super().__init__()
        self.qkv = convert(qkv, f"{path}.qkv")
        self.split_q = convert.leaf(ChannelSplit(dim_out), f"{path}.split_q")  # names timm's lacks
        self.split_k = convert.leaf(ChannelSplit(dim_out), f"{path}.split_k")
        self.q_pool = None if q_pool is None else convert.leaf(q_pool, f"{path}.q_pool")
        self.attention = convert.leaf(attention, f"{path}.attention")  # parameter-free
        self.proj = convert(proj, f"{path}.proj")

    def forward(self, x):
        q, kv = self.split_q(self.qkv(x))
        k, v = self.split_k(kv)
        if self.q_pool is not None:
            q = self.q_pool(q)
        return self.proj(self.attention(q, k, v))


class MirrorAttention(PooledQueryAttention):
    """Hiera's: the attention within mask units or over the image."""

    def __init__(self, module: TimmMaskUnitAttention, convert: Converter, path: str):
        if module.q_stride not in (1, 4):
            raise unsupported(module, path, f"q_stride {module.q_stride}: only 2x2 pooling (4) is mirrored")
        pooled = module.q_stride > 1
        # window_size: the mask unit's sites after the pooling
        unit = math.isqrt(module.window_size) * (2 if pooled else 1) if module.use_mask_unit_attn else None
        super().__init__(module.qkv, module.dim_out, nn.MaxPool2d(2, 2) if pooled else None,
                         MaskUnitAttention(module.heads, module.head_dim, unit), module.proj, convert, path)


class BlockFlow(nn.Module):
    """A Hiera block's flow (Hiera's and SAM 2's): norm1; where the stage starts, the shortcut
    widened: its projection max-pooled over 2x2 sites, or (abswin, no projection) the input's 2x2
    max and average side by side; x + attention, then x + MLP(norm2(x)), each with its layer scale
    and drop path. Subclasses make the children from timm's block (``concat``, ``avg_pool`` of the
    stacked shortcut None where there is none)."""

    def forward(self, x):
        x_norm = self.norm1(x)
        if self.proj is not None:
            x = self.proj(x_norm)
            if self.pool is not None:
                x = self.pool(x)
        elif self.concat is not None:
            x = self.concat(self.pool(x), self.avg_pool(x)) if self.pool is not None else self.concat(x, x)
        x = x + self.drop_path1(self.ls1(self.attn(x_norm)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class MirrorBlock(BlockFlow):
    """Hiera's block: timm's children, the pools its functional code runs made modules."""

    def __init__(self, module: HieraBlock, convert: Converter, path: str):
        super().__init__()
        for name in ("norm1", "proj", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"):
            setattr(self, name, convert(getattr(module, name), f"{path}.{name}"))
        self.widens = module.do_expand  # where a stage starts
        pooled, stacked = module.attn.q_stride > 1, module.do_expand and module.proj is None
        # parameter-free, names timm's lacks
        self.pool = convert.leaf(nn.MaxPool2d(2, 2), f"{path}.pool") if pooled else None
        self.avg_pool = convert.leaf(nn.AvgPool2d(2, 2), f"{path}.avg_pool") if pooled and stacked else None
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat") if stacked else None


def position_table(net: nn.Module) -> Tensor:
    """(C, h, w): what timm's ``_pos_embed`` adds at each site of the model's own h x w map."""
    size = net.unroll.size
    if getattr(net, "pos_embed_win", None) is None:
        return net.pos_embed[0].t().reshape(-1, *size)
    window = net.pos_embed_win.tile([s // m for s, m in zip(size, MASK_UNIT)])
    return (F.interpolate(net.pos_embed, size=size, mode="bicubic", antialias=True) + window)[0]


def hiera_features(net: nn.Module, x) -> list:
    """The four stages' outputs: timm's ``forward_intermediates`` on a timm Hiera (its unrolled
    tokens, rerolled), its flow on the converted body (the same names) with the maps as they are."""
    if isinstance(net, Hiera):
        return net.forward_intermediates(x, intermediates_only=True)
    return stage_outputs(net.blocks, net.patch_embed(x, position_table(net)))


def stage_outputs(blocks: nn.Module, x) -> list:
    """``blocks`` (mirrors with ``widens``) run in order on ``x``: each stage's output, a stage ending
    where the next block widens (Hiera's and SAM 2's)."""
    feats = []
    for i, block in enumerate(blocks):
        x = block(x)
        if i + 1 == len(blocks) or blocks[i + 1].widens:
            feats.append(x)
    return feats


def blocks_layout(model: nn.Module, stem: tuple[str, ...]) -> Layout:
    """``stem``, then the blocks stage by stage up to each of ``model.stage_ends`` (Hiera's and SAM 2's)."""
    check_strides(model, [info["reduction"] for info in model.feature_info])
    ends = model.stage_ends
    stages = tuple(tuple(f"blocks.{i}" for i in range(a + 1, e + 1)) for a, e in zip([-1] + ends[:-1], ends))
    return Layout(stem, stages, tuple(info["num_chs"] for info in model.feature_info))


def hiera_layout(model: Hiera) -> Layout:
    """Every module the features use, stage by stage."""
    return blocks_layout(model, ("unroll", "patch_embed"))


def check(model: Hiera) -> None:
    """Hiera's mask unit must be the mask's patch at every stride; no patch dropout, no video."""
    CheckpointingRefused("blocks")(model)
    if (tuple(model.mask_unit_size), tuple(model.patch_stride), tuple(model.q_stride)) != (MASK_UNIT, PATCH_STRIDE,
                                                                                           Q_STRIDE):
        raise ConversionError(f"Hiera with mask units {model.mask_unit_size}, patch stride {model.patch_stride} and "
                              f"q stride {model.q_stride}: only timm's (8, 8), (4, 4), (2, 2) make the mask unit "
                              "the mask's 32-pixel patch")
    if model.patch_drop_rate > 0:
        raise ConversionError("Hiera's patch dropout (patch_drop_rate) drops mask units at random: SparK's mask "
                              "does that; set it to 0")
    if model.pos_embed is None:
        raise ConversionError("Hiera with separate spatial and temporal position embeddings (video) is not mirrored")


HIERA = Family(
    name="hiera",
    timm_class=Hiera,
    mirrors={PatchEmbed: MirrorPatchEmbed, Unroll: MirrorUnroll, HieraBlock: MirrorBlock,
             TimmMaskUnitAttention: MirrorAttention, Mlp: MirrorMlp, LayerScale: MirrorLayerScale,
             nn.ModuleList: mirror_module_list},
    layout=hiera_layout,
    kept=("head.norm", "head.pre_logits"),
    check=check,
    features=hiera_features,
    input_sizes=own_input_size("adds a position embedding made for its own input size"),
    parameters=("pos_embed", "pos_embed_win"),
)
