"""timm's ``byoanet`` module (ByobNet models, the family is byobnet.py's): BotNet's self-attention
(``botnet26t_256``, ``botnet50ts_256``, ``eca_botnext26ts_256``, ``sebotnet33ts_256``), halo
attention (``halonet26t``, ``halonet50ts``, ``halonet_h1``, ``sehalonet33ts``, ``eca_halonext26ts``,
``haloregnetz_b``; with BotNet's in ``halo2botnet50ts_256``, with lambda layers in
``lamhalobotnet50ts_256``) and lambda layers (``lambda_resnet26t``, ``lambda_resnet50ts``,
``lambda_resnet26rpt_256``).

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

HaloNet: the 3x3 is a halo attention: the map cut into blocks of queries (8x8 sites, RegNetZ's 7x7),
each attending to its block's keys widened by a halo of 2 or 3 sites on every side, with relative-
position logits within that window; timm zero-pads the map for the halo, so beyond the image's
border the padding's keys count, zero content and value, their position logits alone. Here each
visible query attends to the visible keys of its window and that padding (``HaloAttention``); maps
must be whole blocks, as in timm: input sizes that make them.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from timm.layers.bottleneck_attn import BottleneckAttn
from timm.layers.halo_attn import HaloAttn
from timm.layers.lambda_layer import LambdaLayer
from torch import Tensor, nn

from ..attention import RelativeLogitsAttention
from ..family import InputSizes, input_shapes, meta_model
from ..leaves import ChannelConcat, ChannelSplit
from ..mirrors import Converter
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


def grid_sites(side: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Each site's row and column in a side x side grid, row by row."""
    site = torch.arange(side * side, device=device)
    return site // side, site % side


class HaloAttention(nn.Module):
    """timm's ``HaloAttn`` after its projections: the keys' map cut into ``block`` x ``block``
    blocks, each block's queries (every ``q_stride``-th site: ``block // q_stride`` a side) attending
    to the keys of the block widened by ``halo`` sites on every side (each head's k then v), the
    logits plus each query's products with embeddings of the key's row and column in the window
    minus the query's in its block (``height_rel``, ``width_rel``: timm's ``PosEmbedRel``), scaled
    with the dot products where ``scale_pos_embed``. Sites beyond the map's border are keys of zero
    content and value, as timm's padding; of the map's sites only ``keys`` count. A parameter-free
    leaf every engine converts to its own twin."""

    def __init__(self, num_heads: int, key_dim: int, value_dim: int, block: int, halo: int, q_stride: int,
                 scale_pos_embed: bool):
        super().__init__()
        self.num_heads, self.key_dim, self.value_dim = num_heads, key_dim, value_dim
        self.block, self.halo, self.q_stride, self.scale_pos_embed = block, halo, q_stride, scale_pos_embed

    def like(self, cls: type) -> "HaloAttention":
        return cls(self.num_heads, self.key_dim, self.value_dim, self.block, self.halo, self.q_stride,
                   self.scale_pos_embed)

    def check(self, h: int, w: int) -> None:
        """Refuse, in one line, a map that is not whole blocks (timm's asserts)."""
        if h % self.block or w % self.block:
            raise ValueError(f"halo attention cuts its map into blocks of {self.block}x{self.block} sites, got "
                             f"{h}x{w}; use an input size that makes whole blocks")

    def attend(self, q: Tensor, kv: Tensor, keys: Tensor, height_rel: Tensor, width_rel: Tensor) -> Tensor:
        """(B, heads * key_dim, h / q_stride, w / q_stride) queries, (B, heads * (key_dim + value_dim), h,
        w) keys and values, (B, h, w) bool: which sites count as keys -> (B, heads * value_dim, h /
        q_stride, w / q_stride)."""
        b, _, h, w = kv.shape
        self.check(h, w)
        heads, kd, vd, size, halo = self.num_heads, self.key_dim, self.value_dim, self.block, self.halo
        side, win, nh, nw = size // self.q_stride, size + 2 * halo, h // size, w // size
        q = q.reshape(b, heads, kd, nh, side, nw, side).permute(0, 1, 3, 5, 4, 6, 2).reshape(b, heads, nh * nw, -1, kd)
        windows = F.pad(kv, [halo] * 4).unfold(2, win, size).unfold(3, win, size)  # (B, C, nh, nw, win, win)
        k, v = windows.reshape(b, heads, kd + vd, nh * nw, win * win).permute(0, 1, 3, 4, 2).split([kd, vd], -1)
        counted = F.pad(keys.to(torch.uint8), [halo] * 4, value=1).unfold(1, win, size).unfold(2, win, size)
        counted = counted.reshape(b, 1, nh * nw, 1, win * win).bool()
        (qy, qx), (ky, kx) = grid_sites(side, q.device), grid_sites(win, q.device)
        rows, cols = ((at[None, :] - of[:, None] + win - 1).expand(b, heads, nh * nw, -1, -1)
                      for of, at in ((qy, ky), (qx, kx)))
        out = self.attend_windows(q, k, v, counted, rows, cols, height_rel, width_rel)  # (B, heads, blocks, n, vd)
        out = out.reshape(b, heads, nh, nw, side, side, vd).permute(0, 1, 6, 2, 4, 3, 5)
        return out.reshape(b, heads * vd, nh * side, nw * side)

    def attend_windows(self, q: Tensor, k: Tensor, v: Tensor, counted: Tensor, rows: Tensor, cols: Tensor,
                       height_rel: Tensor, width_rel: Tensor) -> Tensor:
        """(..., n, key_dim) queries, (..., win * win, key_dim) keys and (..., value_dim) values of
        their windows, which keys count (bool, broadcast to the logits), each query's and key's
        index in the row and column tables ((..., n, win * win): the key's row in the window minus
        the query's in its block, plus win - 1) -> (..., n, value_dim). The padding counts as keys; a
        window without a key (its block hidden): outputs never read."""
        relative = (q @ height_rel.to(q.dtype).t()).gather(-1, rows) + (q @ width_rel.to(q.dtype).t()).gather(-1, cols)
        logits = q @ k.transpose(-1, -2)
        kd = self.key_dim
        logits = (logits + relative) * kd ** -0.5 if self.scale_pos_embed else logits * kd ** -0.5 + relative
        counted = counted | ~counted.any(-1, keepdim=True)
        return logits.masked_fill(~counted, float("-inf")).softmax(-1) @ v

    def forward(self, q: Tensor, kv: Tensor, height_rel: Tensor, width_rel: Tensor) -> Tensor:
        keys = kv.new_ones(kv.shape[0], *kv.shape[2:], dtype=torch.bool)
        return self.attend(q, kv, keys, height_rel, width_rel)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, key_dim={self.key_dim}, value_dim={self.value_dim}, "
                f"block={self.block}, halo={self.halo}, q_stride={self.q_stride}, "
                f"scale_pos_embed={self.scale_pos_embed}")


class MirrorHaloAttn(nn.Module):
    """q (a 1x1, strided where the block strides and its blocks halve), kv (a 1x1), the halo
    attention (``pos_embed.height_rel``, ``.width_rel`` under timm's names), pool (a 2x2 average where
    the block strides by pooling)."""

    def __init__(self, module: HaloAttn, convert: Converter, path: str):
        super().__init__()
        self.q = convert.leaf(module.q, f"{path}.q")
        self.kv = convert.leaf(module.kv, f"{path}.kv")
        self.pos_embed = nn.Module()  # holds timm's two tables under their names
        self.pos_embed.height_rel = nn.Parameter(module.pos_embed.height_rel.detach().clone())
        self.pos_embed.width_rel = nn.Parameter(module.pos_embed.width_rel.detach().clone())
        attention = HaloAttention(module.num_heads, module.dim_head_qk, module.dim_head_v, module.block_size,
                                  module.halo_size, module.block_stride, module.scale_pos_embed)
        self.attention = convert.leaf(attention, f"{path}.attention")  # parameter-free, a name timm's lacks
        self.pool = convert.leaf(module.pool, f"{path}.pool")

    def forward(self, x):
        out = self.attention(self.q(x), self.kv(x), self.pos_embed.height_rel, self.pos_embed.width_rel)
        return self.pool(out)


def input_sizes(name: str) -> InputSizes:
    """A BotNet's or a global lambda network's: up to its own input size (its relative position
    tables reach that map, no larger). A HaloNet's: multiples of every halo attention's block in
    pixels (timm cuts its maps into whole blocks). Both where a model has both."""
    model = meta_model(name)
    sizes = InputSizes()
    if any(isinstance(m, BottleneckAttn) or isinstance(m, LambdaLayer) and m.pos_emb is not None
           for m in model.modules()):
        sizes = InputSizes(largest=model.pretrained_cfg["input_size"][-1],
                           why_largest="has relative position tables that reach the map of its own input size")
    halos = [m for m in model.modules() if isinstance(m, HaloAttn)]
    if halos:
        size = model.pretrained_cfg["input_size"][-1]
        blocks = [m.block_size * size // shape[-1] for m, shape in input_shapes(model, halos, size)]
        sizes = replace(sizes, multiple=math.lcm(sizes.multiple, *blocks),
                        why_multiple="cuts its maps into whole blocks of halo attention")
    return sizes


MIRRORS = {BottleneckAttn: MirrorBottleneckAttn, LambdaLayer: MirrorLambdaLayer, HaloAttn: MirrorHaloAttn}
