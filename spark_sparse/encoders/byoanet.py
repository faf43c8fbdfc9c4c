"""BotNet's self-attention blocks (timm's ``byoanet`` module: ``botnet26t_256``, ``botnet50ts_256``,
``eca_botnext26ts_256``, ``sebotnet33ts_256``; ByobNet models, the family is byobnet.py's).

A bottleneck whose 3x3 is a bottleneck attention: a 1x1 to every head's q, then k, then v, global
attention over the map whose logits add each query's products with learned embeddings of the key's
row and column offset (timm's ``PosEmbedRel``, made for the map of the model's input size), then a
2x2 average pooling where the block strides. Here each visible query attends to its image's
visible keys (``attention.RelativeLogitsAttention``); the offsets are relative, so an image keeps
its features in a larger hidden canvas as long as the tables reach its map: input sizes up to the
model's own (timm runs that one alone). Halo attention (keys from halos zero-padded at the map's
borders, the padding keys too: no exact sparse twin) and lambda layers (not mirrored) are refused
by path.
"""

from __future__ import annotations

import timm
import torch
from timm.layers.bottleneck_attn import BottleneckAttn
from timm.layers.halo_attn import HaloAttn
from timm.layers.lambda_layer import LambdaLayer
from torch import nn

from .attention import RelativeLogitsAttention
from .family import Converter, InputSizes


class MirrorBottleneckAttn(nn.Module):
    """qkv (a 1x1), the attention with relative logits (``pos_embed.height_rel``, ``.width_rel``
    under timm's names), pool (a 2x2 average where the block strides)."""

    def __init__(self, module: BottleneckAttn, convert: Converter, path: str):
        super().__init__()
        self.qkv = convert.leaf(module.qkv, f"{path}.qkv")
        self.pos_embed = nn.Module()  # holds timm's two tables under their names
        self.pos_embed.height_rel = nn.Parameter(module.pos_embed.height_rel.detach().clone())
        self.pos_embed.width_rel = nn.Parameter(module.pos_embed.width_rel.detach().clone())
        feat = (module.pos_embed.height, module.pos_embed.width)
        attention = RelativeLogitsAttention(module.num_heads, module.dim_head_qk, module.dim_head_v, feat,
                                           module.scale_pos_embed)
        self.attention = convert.leaf(attention, f"{path}.attention")  # parameter-free, a name timm's lacks
        self.pool = convert.leaf(module.pool, f"{path}.pool")

    def forward(self, x):
        return self.pool(self.attention(self.qkv(x), self.pos_embed.height_rel, self.pos_embed.width_rel))


def input_sizes(name: str) -> InputSizes:
    """A BotNet's: up to its own input size (its relative position tables reach that map, no larger)."""
    with torch.device("meta"):  # no weights made
        model = timm.create_model(name, pretrained=False, num_classes=0)
    if any(isinstance(m, BottleneckAttn) for m in model.modules()):
        return InputSizes(largest=model.pretrained_cfg["input_size"][-1],
                          why_largest="has relative position tables that reach the map of its own input size")
    return InputSizes()


MIRRORS = {BottleneckAttn: MirrorBottleneckAttn}
REFUSED = {
    HaloAttn: "halo attention's keys come from halos zero-padded at the map's borders (the padding's zeros are "
              "keys): it has no exact sparse twin",
    LambdaLayer: "lambda layers (a content lambda over the whole map, position lambdas from an r x r 3-D convolution "
                 "or from every offset of the map) are not mirrored",
}
