"""timm's ``byoanet`` module (ByobNet models, the family is byobnet.py's): BotNet's self-attention
(``botnet26t_256``, ``botnet50ts_256``, ``eca_botnext26ts_256``, ``sebotnet33ts_256``) and lambda
layers (``lambda_resnet26t``, ``lambda_resnet50ts``, ``lambda_resnet26rpt_256``).

BotNet: a bottleneck whose 3x3 is a bottleneck attention: a 1x1 to every head's q, then k, then v,
global attention over the map whose logits add each query's products with learned embeddings of the
key's row and column offset (timm's ``PosEmbedRel``, made for the map of the model's input size),
then a 2x2 average pooling where the block strides. Here each visible query attends to its image's
visible keys (``attention.RelativeLogitsAttention``); the offsets are relative, so an image keeps
its features in a larger hidden canvas as long as the tables reach its map: input sizes up to the
model's own (timm runs that one alone).

Lambda-ResNet: the 3x3 is a lambda layer (lambdas.py): each image's content lambda over its visible
sites, each site's position lambda from a 9x9 convolution of v (hidden sites read zero, as the
padding does: any input size) or, in ``rpt``, from embeddings of offsets (up to its own size).

Halo attention (keys from halos zero-padded at the map's borders, the padding keys too: no exact
sparse twin) is refused by path.
"""

from __future__ import annotations

import timm
import torch
from timm.layers.bottleneck_attn import BottleneckAttn
from timm.layers.halo_attn import HaloAttn
from timm.layers.lambda_layer import LambdaLayer
from torch import nn

from .attention import RelativeLogitsAttention
from .family import ChannelConcat, ChannelSplit, Converter, InputSizes
from .lambdas import LambdaMixing, PositionLambdas


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


class MirrorLambdaLayer(nn.Module):
    """qkv (a 1x1) split into every head's q, k and v, q's and v's norms, the position lambdas
    (``conv_lambda``, local) or their embeddings (``pos_emb``, global) under timm's names, the mixing
    (``lambdas.py``), pool (a 2x2 average where the block strides)."""

    def __init__(self, module: LambdaLayer, convert: Converter, path: str):
        super().__init__()
        heads, key_dim, value_dim = module.num_heads, module.dim_qk, module.dim_v
        self.qkv = convert.leaf(module.qkv, f"{path}.qkv")
        self.split_q = convert.leaf(ChannelSplit(heads * key_dim), f"{path}.split_q")  # names timm's lacks
        self.split_k = convert.leaf(ChannelSplit(key_dim), f"{path}.split_k")
        self.norm_q = convert.leaf(module.norm_q, f"{path}.norm_q")
        self.norm_v = convert.leaf(module.norm_v, f"{path}.norm_v")
        if module.conv_lambda is not None:
            self.conv_lambda = convert.leaf(PositionLambdas(module.conv_lambda, value_dim), f"{path}.conv_lambda")
            self.pos_emb = None
        else:
            self.pos_emb = nn.Parameter(module.pos_emb.detach().clone())
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat")
        self.mixing = convert.leaf(LambdaMixing(heads, key_dim, value_dim, module.feat_size), f"{path}.mixing")
        self.pool = convert.leaf(module.pool, f"{path}.pool")

    def forward(self, x):
        q, kv = self.split_q(self.qkv(x))
        k, v = self.split_k(kv)
        q, v = self.norm_q(q), self.norm_v(v)
        parts = (q, k, v) if self.pos_emb is not None else (q, k, v, self.conv_lambda(v))
        return self.pool(self.mixing(self.concat(*parts), self.pos_emb))


def input_sizes(name: str) -> InputSizes:
    """A BotNet's or a global lambda network's: up to its own input size (its relative position
    tables reach that map, no larger)."""
    with torch.device("meta"):  # no weights made
        model = timm.create_model(name, pretrained=False, num_classes=0)
    if any(isinstance(m, BottleneckAttn) or isinstance(m, LambdaLayer) and m.pos_emb is not None
           for m in model.modules()):
        return InputSizes(largest=model.pretrained_cfg["input_size"][-1],
                          why_largest="has relative position tables that reach the map of its own input size")
    return InputSizes()


MIRRORS = {BottleneckAttn: MirrorBottleneckAttn, LambdaLayer: MirrorLambdaLayer}
REFUSED = {
    HaloAttn: "halo attention's keys come from halos zero-padded at the map's borders (the padding's zeros are "
              "keys): it has no exact sparse twin",
}
