"""The Global Context ViT family (timm ``gcvit``: ``gcvit_xxtiny`` .. ``gcvit_base``; ICML 2023).

A 3x3 stride-2 convolution and a downsampling block (layer norm, a fused MBConv without norms: a
depthwise 3x3, GELU, SE, a 1x1, plus its input; a 3x3 stride-2 convolution; layer norm) are the
stem; every later stage starts with such a block. Each stage holds blocks of windowed attention
(x + attention(norm1(x)), x + MLP(norm2(x)), layer scales where the model has them) over groups of
``window`` x ``window`` sites with a learned bias per relative offset, every other block with global
queries: the stage's map reduced to one window's sites (MBConvs and 3x3 stride-2 max poolings: one
token per 32-pixel patch at 224 px) gives the query of every group's i-th site its i-th token, and
each group's own sites the keys and values. Here the global tokens are tiled over the map
(``TiledTokens``), a hidden one a zero query (attending by the bias alone), and each visible query
attends to its group's visible keys (``attention.WindowAttention``). The windows are the input
size's fractions, so a model runs at its own input size only, as in timm.
"""

from __future__ import annotations

import torch
from timm.layers import LayerScale, Mlp
from timm.models.gcvit import (Downsample2d, FeatureBlock, GlobalContextVit, GlobalContextVitBlock,
                               GlobalContextVitStage, MbConvBlock, Stem, WindowAttentionGlobal)
from torch import nn

from ..attention import WindowAttention
from .convnext import MirrorMlp
from ..family import Family, own_input_size
from ..layouts import NamedStages
from ..leaves import ChannelConcat, square
from ..mirrors import Converter, MirrorChildren, MirrorInOrder, MirrorLayerScale
from ..refusals import CheckpointingRefused


class TiledTokens(nn.Module):
    """(a ``window`` x ``window`` map of tokens, a finer map of whole groups of that many sites) ->
    the tokens repeated over the finer map, group after group: its site (y, x) takes token
    (y % window, x % window) (GCViT's global queries, one per site of a group); a leaf every
    engine converts to its own twin."""

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def check(self, tokens: tuple[int, int], sites: tuple[int, int]) -> None:
        """Refuse maps that are not one group's tokens and whole groups (another input size than the model's)."""
        ws = self.window
        if tokens != (ws, ws) or sites[0] % ws or sites[1] % ws:
            raise ValueError(f"GCViT's global tokens are a {tokens[0]}x{tokens[1]} map for a {sites[0]}x{sites[1]} "
                             f"one in groups of {ws}x{ws} sites: run it at the input size it was made for")

    def forward(self, tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        self.check(tokens.shape[-2:], like.shape[-2:])
        ws, (h, w) = self.window, like.shape[-2:]
        return tokens.repeat(1, 1, h // ws, w // ws)

    def extra_repr(self) -> str:
        return f"window={self.window}"


class MirrorMbConvBlock(MirrorChildren):
    """A depthwise 3x3, GELU, SE, a 1x1, plus the input (no norms)."""

    children_names = ("conv_dw", "act", "se", "conv_pw")

    def forward(self, x):
        return x + self.conv_pw(self.se(self.act(self.conv_dw(x))))


class MirrorDownsample(MirrorInOrder):
    children_names = ("norm1", "conv_block", "reduction", "norm2")


class MirrorStem(MirrorInOrder):
    children_names = ("conv1", "down")


class MirrorFeatureBlock(MirrorInOrder):
    children_names = ("blocks",)


class RelativePositionBias(nn.Module):
    """timm's ``RelPosBias`` table (trained, under its name) and index, as a (heads, L, L) bias."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(module.relative_position_bias_table.detach().clone())
        # flat: the offset of every pair of a group's sites
        self.register_buffer("relative_position_index", module.relative_position_index.clone(), persistent=False)
        self.area = module.window_area

    def forward(self) -> torch.Tensor:
        bias = self.relative_position_bias_table[self.relative_position_index]
        return bias.view(self.area, self.area, -1).permute(2, 0, 1)


class MirrorWindowAttentionGlobal(MirrorChildren):
    """qkv (k and v only where the queries are global), [the global tokens tiled over the map as the
    queries], attention within groups of sites with the bias of each pair's relative offset, proj."""

    children_names = ("qkv", "proj")
    dropouts = ("attn_drop", "proj_drop")

    def __init__(self, module: WindowAttentionGlobal, convert: Converter, path: str):
        super().__init__(module, convert, path)
        window = square(module.window_size, module, path)
        self.rel_pos = RelativePositionBias(module.rel_pos)
        self.use_global = module.use_global
        # parameter-free, names timm's module lacks
        attention = WindowAttention(module.num_heads, module.head_dim, module.head_dim, window)
        self.attention = convert.leaf(attention, f"{path}.attention")
        if self.use_global:
            self.tile = convert.leaf(TiledTokens(window), f"{path}.tile")
            self.concat = convert.leaf(ChannelConcat(), f"{path}.concat")

    def forward(self, x, global_tokens):
        tokens = self.qkv(x)
        if self.use_global:
            tokens = self.concat(self.tile(global_tokens, tokens), tokens)
        return self.proj(self.attention(tokens, self.rel_pos()))


class MirrorBlock(MirrorChildren):
    """x + drop_path1(ls1(attn(norm1(x), global tokens))), then x + drop_path2(ls2(mlp(norm2(x))))."""

    children_names = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")

    def forward(self, x, global_tokens):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), global_tokens)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class MirrorStage(MirrorChildren):
    """[The downsampling block], the global tokens from the stage's input (its feature block, global
    norm), the blocks with them, [the stage's norm]."""

    children_names = ("downsample", "global_block", "global_norm", "norm")

    def __init__(self, stage: GlobalContextVitStage, convert: Converter, path: str):
        super().__init__(stage, convert, path)
        self.blocks = nn.ModuleList(convert(block, f"{path}.blocks.{i}") for i, block in enumerate(stage.blocks))

    def forward(self, x):
        x = self.downsample(x)
        global_tokens = self.global_norm(self.global_block(x))
        for block in self.blocks:
            x = block(x, global_tokens)
        return self.norm(x)


GCVIT = Family(
    name="gcvit",
    timm_class=GlobalContextVit,
    mirrors={Stem: MirrorStem, Downsample2d: MirrorDownsample, MbConvBlock: MirrorMbConvBlock,
             FeatureBlock: MirrorFeatureBlock, GlobalContextVitStage: MirrorStage, GlobalContextVitBlock: MirrorBlock,
             WindowAttentionGlobal: MirrorWindowAttentionGlobal, Mlp: MirrorMlp, LayerScale: MirrorLayerScale},
    layout=NamedStages(("stem",), ("stages.0", "stages.1", "stages.2", "stages.3")),
    check=CheckpointingRefused("stages"),
    input_sizes=own_input_size("has windows made for its own input size"),
)
