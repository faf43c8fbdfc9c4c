"""The SAM 2 Hiera family (timm ``hieradet_sam2``: ``sam2_hiera_tiny``, ``_small``, ``_base_plus``,
``_large``, ``hieradet_small``): SAM 2's image encoder.

A 7x7 stride-4 convolution, plus a position embedding: a global table resized bicubically to the
map and a window's own table tiled over it; then transformer blocks, x + attention(norm1(x)), x +
MLP(norm2(x)). A stage's first block projects the normed input to its wider channels and max-pools
it and the attention's queries over 2x2 sites. Most blocks attend within windows of sites laid from
the map's corner (8x8 at stride 4 and 4x4 at 8: the mask's 32-pixel patch; 14x14 or 16x16 at 16,
7x7 or 8x8 at 32: several patches), some over the whole image. Each visible query attends to the
visible keys of its window (``attention.MaskUnitAttention``, Hiera's, with windows of any size).

timm pads a map that is not whole windows with zeros that its attention then reads as keys (their
projections' biases); here the maps must be whole windows: input sizes that make them (multiples of
224 px for windows of 14 and 7, of 256 for 16 and 8). The position embedding is resized to the
map, the whole canvas's: batch independence, not canvas invariance.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch.nn.functional as F
from timm.layers import LayerScale, Mlp
from timm.models.hieradet_sam2 import HieraDet, HieraPatchEmbed, MultiScaleAttention, MultiScaleBlock
from torch import Tensor, nn

from ..attention import AbsolutePositions, MaskUnitAttention
from .convnext import MirrorMlp
from ..family import Family, InputSizes, input_shapes, meta_model
from ..layouts import Layout
from ..leaves import square
from ..mirrors import Converter, MirrorLayerScale
from ..refusals import CheckpointingRefused, ConversionError, unsupported
from .hiera import BlockFlow, PooledQueryAttention, blocks_layout, stage_outputs


class MirrorPatchEmbed(nn.Module):
    """The 7x7 stride-4 convolution (``proj``), then the position embedding's table added."""

    def __init__(self, module: HieraPatchEmbed, convert: Converter, path: str):
        super().__init__()
        self.proj = convert(module.proj, f"{path}.proj")
        self.positions = convert.leaf(AbsolutePositions(), f"{path}.positions")  # a name timm's lacks

    def forward(self, x, table: Callable[[int, int], Tensor]):
        return self.positions(self.proj(x), table)


def mirror_attention(module: MultiScaleAttention, window: int | None, convert: Converter,
                     path: str) -> PooledQueryAttention:
    """The attention within windows of ``window`` sites at the block's input stride, or over the
    image (None); q max-pooled where the block pools (timm's ``q_pool``)."""
    attention = MaskUnitAttention(module.num_heads, module.dim_out // module.num_heads, window)
    return PooledQueryAttention(module.qkv, module.dim_out, module.q_pool, attention, module.proj, convert, path)


class MirrorBlock(BlockFlow):
    """SAM 2's block: Hiera's flow, where a stage starts the shortcut the normed input projected and
    max-pooled over 2x2 sites (no stacked shortcut)."""

    def __init__(self, module: MultiScaleBlock, convert: Converter, path: str):
        super().__init__()
        if module.q_stride is not None and tuple(module.q_stride) != (2, 2):
            raise unsupported(module, path, f"q_stride {module.q_stride}: only 2x2 pooling is mirrored")
        window = square(module.window_size, module, path) if module.is_windowed else None
        for name in ("norm1", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"):
            setattr(self, name, convert(getattr(module, name), f"{path}.{name}"))
        self.widens = module.dim != module.dim_out  # where a stage starts
        self.proj = convert(module.proj, f"{path}.proj") if self.widens else None
        self.pool = convert.leaf(module.pool, f"{path}.pool") if self.widens and module.pool is not None else None
        self.attn = mirror_attention(module.attn, window, convert, f"{path}.attn")
        self.concat = None  # no stacked shortcut


def position_table(net: nn.Module, size: tuple[int, int]) -> Tensor:
    """(C, h, w): what timm's ``_pos_embed`` adds at each site of an h x w map."""
    window = net.pos_embed_window
    tiles = [s // w for s, w in zip(size, window.shape[-2:])]
    return (F.interpolate(net.pos_embed, size=size, mode="bicubic") + window.tile(tiles))[0]


def hieradet_features(net: nn.Module, x) -> list:
    """The four stages' outputs: timm's ``forward_intermediates`` on a timm model, its flow on the
    converted body (the same names)."""
    if isinstance(net, HieraDet):
        return net.forward_intermediates(x, intermediates_only=True)
    return stage_outputs(net.blocks, net.patch_embed(x, lambda h, w: position_table(net, (h, w))))  # resized


def hieradet_layout(model: HieraDet) -> Layout:
    """The patch embedding, then the blocks stage by stage."""
    return blocks_layout(model, ("patch_embed",))


def check(model: HieraDet) -> None:
    """timm's 7x7 stride-4 patch embedding; no gradient checkpointing."""
    CheckpointingRefused("blocks")(model)
    if not isinstance(model.patch_embed, HieraPatchEmbed) or model.patch_embed.proj.stride != (4, 4):
        raise ConversionError("SAM 2's Hiera with another patch embedding (patch_size) is not mirrored: only its "
                              "stride-4 convolution")


def input_sizes(name: str) -> InputSizes:
    """Multiples of every window in pixels (timm pads a map of part windows, whose zeros its attention
    reads as keys) and of the window position table's (tiled over the map at stride 4)."""
    model = meta_model(name)
    size = model.pretrained_cfg["input_size"][-1]
    windowed = [block for block in model.blocks if block.is_windowed]
    spans = [4 * model.pos_embed_window.shape[-1]] + [  # blocks' maps are channels-last
        block.window_size[0] * size // shape[1] for block, shape in input_shapes(model, windowed, size)]
    return InputSizes(math.lcm(InputSizes.multiple, *spans), "attends within windows that must be whole at every "
                                                             "stride (timm pads others with keys)")


HIERADET = Family(
    name="hieradet_sam2",
    timm_class=HieraDet,
    mirrors={HieraPatchEmbed: MirrorPatchEmbed, MultiScaleBlock: MirrorBlock, Mlp: MirrorMlp,
             LayerScale: MirrorLayerScale},
    layout=hieradet_layout,
    kept=("head.norm", "head.pre_logits"),
    check=check,
    features=hieradet_features,
    input_sizes=input_sizes,
    parameters=("pos_embed", "pos_embed_window"),
)
