"""The EfficientFormerV2 family (timm ``efficientformer_v2``: ``efficientformerv2_s0``, ``_s1``, ``_s2``, ``_l``).

A stem of two 3x3 stride-2 conv-norm-GELUs; blocks of an MLP of batch-normed 1x1 convolutions
around a depthwise 3x3 (each branch with layer scale); a 3x3 stride-2 conv-norm starting each later
stage. The last blocks of the third and fourth stages attend: q, k and v from batch-normed 1x1s,
per head softmax(q k^T d^-1/2 + a learned bias of the query's and key's absolute row and column
offsets) v, the heads mixed by 1x1 convolutions before and after the softmax (talking heads), plus
a depthwise 3x3 of v, GELU, a projection. At stride 16 the attention runs on the map reduced by a
depthwise 3x3 at stride 2 (one token per 32-pixel patch) and its output is upsampled bilinearly
back to stride 16 (each site reads its patch's token and, three parts to one, a neighbouring
patch's: zero where that patch is hidden, as in dense masking). The fourth stage's downsampling
adds such an attention whose queries are at stride 32 (a strided depthwise 3x3 plus the map's
even sites) and keys at 16. Each visible query attends to its image's visible keys.

The bias tables are indexed by offsets on the grid of the model's own input size: EfficientFormerV2
runs at that size alone, as timm does (batch independence, not canvas invariance).
"""

from __future__ import annotations

import copy

import torch
from timm.layers import ConvNormAct, LayerScale2d
from timm.models.efficientformer_v2 import (Attention2d, Attention2dDownsample, ConvMlpWithNorm, ConvNorm, Downsample,
                                            EfficientFormerV2, EfficientFormerV2Block, EfficientFormerV2Stage,
                                            LocalGlobalQuery, Stem4)
from torch import Tensor, nn

from ..attention import map_tokens
from ..family import Family, own_input_size
from ..layouts import NamedStages
from ..mirrors import Converter, MirrorChildren, MirrorConvNormAct, MirrorInOrder, MirrorLayerScale, MirrorSequential
from ..refusals import CheckpointingRefused


class OffsetBiasAttention(nn.Module):
    """EfficientFormerV2's attention after its projections: per head, softmax((q k^T) d^-1/2 + the
    bias of the pair's absolute row and column offsets, ``biases[:, |dy| * w + |dx|]`` on the keys'
    ``resolution`` (h, w) grid) v, where ``talking`` the heads mixed by timm's 1x1 convolutions
    before and after the softmax. Queries lie on every ``q_step``-th site of the keys' grid. Each
    visible query attends to its image's visible keys. A parameter-free leaf every engine converts
    to its own twin (the tables and the talking heads are the block's, under timm's names)."""

    def __init__(self, num_heads: int, key_dim: int, value_dim: int, resolution: tuple[int, int], q_step: int,
                 talking: bool):
        super().__init__()
        self.num_heads, self.key_dim, self.value_dim = num_heads, key_dim, value_dim
        self.resolution, self.q_step, self.talking = tuple(resolution), q_step, talking

    def like(self, cls: type) -> "OffsetBiasAttention":
        return cls(self.num_heads, self.key_dim, self.value_dim, self.resolution, self.q_step, self.talking)

    def check(self, h: int, w: int) -> None:
        """Refuse, in one line, keys on a map other than the one the bias tables are made for."""
        if (h, w) != self.resolution:
            raise ValueError(f"EfficientFormerV2's attention biases are made for maps of {self.resolution[0]}x"
                             f"{self.resolution[1]} sites, got {h}x{w}; use the model's own input size")

    def attend(self, q: Tensor, k: Tensor, v: Tensor, keys: Tensor, q_at: tuple[Tensor, Tensor],
               k_at: tuple[Tensor, Tensor], biases: Tensor, heads_before: nn.Module | None,
               heads_after: nn.Module | None) -> Tensor:
        """(B, n, heads * key_dim) queries, (B, m, heads * key_dim) keys, (B, m, heads * value_dim)
        values, (B, m) bool: which keys count, each query's and key's (row, column) on their own
        grids -> (B, n, heads * value_dim)."""
        (b, n, _), m = q.shape, k.shape[1]
        q = q.view(b, n, self.num_heads, self.key_dim).transpose(1, 2)
        k = k.view(b, m, self.num_heads, self.key_dim).transpose(1, 2)
        v = v.view(b, m, self.num_heads, self.value_dim).transpose(1, 2)
        dy = (q_at[0][:, :, None] * self.q_step - k_at[0][:, None, :]).abs()
        dx = (q_at[1][:, :, None] * self.q_step - k_at[1][:, None, :]).abs()
        bias = biases[:, dy * self.resolution[1] + dx].transpose(0, 1)  # (B, heads, n, m)
        logits = (q @ k.transpose(-1, -2)) * self.key_dim ** -0.5 + bias.to(q.dtype)
        if heads_before is not None:
            logits = heads_before(logits)
        keys = keys | ~keys.any(1, keepdim=True)  # an image without a key: outputs never read
        attn = logits.masked_fill(~keys[:, None, None, :], float("-inf")).softmax(-1)
        if heads_after is not None:
            attn = heads_after(attn)  # its bias weighs hidden keys too: their values are zero
        return (attn @ v).transpose(1, 2).reshape(b, n, -1)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, biases: Tensor, heads_before: nn.Module | None = None,
                heads_after: nn.Module | None = None) -> Tensor:
        b, _, h, w = q.shape
        self.check(*k.shape[-2:])
        (queries, qy, qx), (keys, ky, kx) = map_tokens(q), map_tokens(k)
        present = keys.new_ones(keys.shape[:2], dtype=torch.bool)
        out = self.attend(queries, keys, map_tokens(v)[0], present, (qy, qx), (ky, kx), biases, heads_before,
                          heads_after)
        return out.transpose(1, 2).reshape(b, -1, h, w)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, key_dim={self.key_dim}, value_dim={self.value_dim}, "
                f"resolution={self.resolution}, q_step={self.q_step}, talking={self.talking}")


class MirrorAttention2d(MirrorChildren):
    """[The depthwise 3x3 at stride 2], q, k, v, the attention (``OffsetBiasAttention``) plus
    v_local (a depthwise 3x3 of v), [the bilinear upsampling], GELU, proj; the bias table and the
    talking heads under timm's names."""

    children_names = ("stride_conv", "q", "k", "v", "v_local", "upsample", "act", "proj")

    def __init__(self, module: Attention2d, convert: Converter, path: str):
        super().__init__(module, convert, path)
        self.attention_biases = nn.Parameter(module.attention_biases.detach().clone())
        # they mix the heads of the attention matrix, not the map's channels: timm's modules, run as they are
        self.talking_head1 = copy.deepcopy(module.talking_head1)
        self.talking_head2 = copy.deepcopy(module.talking_head2)
        attention = OffsetBiasAttention(module.num_heads, module.key_dim, module.d, module.resolution, 1, True)
        self.attention = convert.leaf(attention, f"{path}.attention")  # parameter-free, a name timm's lacks

    def forward(self, x):
        if self.stride_conv is not None:
            x = self.stride_conv(x)
        v = self.v(x)
        out = self.attention(self.q(x), self.k(x), v, self.attention_biases, self.talking_head1, self.talking_head2)
        out = out + self.v_local(v)
        if self.upsample is not None:
            out = self.upsample(out)
        return self.proj(self.act(out))


class MirrorAttention2dDownsample(MirrorChildren):
    """Queries at stride 2 (``LocalGlobalQuery``), keys and values at the input's stride, the
    attention plus v_local (a depthwise 3x3 of v at stride 2), GELU, proj."""

    children_names = ("q", "k", "v", "v_local", "act", "proj")

    def __init__(self, module: Attention2dDownsample, convert: Converter, path: str):
        super().__init__(module, convert, path)
        self.attention_biases = nn.Parameter(module.attention_biases.detach().clone())
        attention = OffsetBiasAttention(module.num_heads, module.key_dim, module.d, module.resolution, 2, False)
        self.attention = convert.leaf(attention, f"{path}.attention")  # parameter-free, a name timm's lacks

    def forward(self, x):
        v = self.v(x)
        out = self.attention(self.q(x), self.k(x), v, self.attention_biases) + self.v_local(v)
        return self.proj(self.act(out))


class MirrorLocalGlobalQuery(MirrorChildren):
    """proj(a depthwise 3x3 at stride 2 + the map's even sites, a 1x1 average pooling at stride 2)."""

    children_names = ("local", "pool", "proj")

    def forward(self, x):
        return self.proj(self.local(x) + self.pool(x))


class MirrorDownsample(MirrorChildren):
    """The 3x3 stride-2 conv-norm, plus the attention's output where it has one."""

    children_names = ("conv", "attn")

    def forward(self, x):
        out = self.conv(x)
        return out if self.attn is None else self.attn(x) + out


class MirrorMlp(MirrorInOrder):
    """fc1 (1x1 conv-norm-GELU), mid (a depthwise 3x3 conv-norm-GELU), fc2 (1x1 conv-norm); dropout 0."""

    children_names = ("fc1", "mid", "fc2")
    dropouts = ("drop1", "drop2")


class MirrorBlock(MirrorChildren):
    """[x + drop_path1(ls1(attention(x)))], then x + drop_path2(ls2(mlp(x)))."""

    children_names = ("token_mixer", "ls1", "drop_path1", "mlp", "ls2", "drop_path2")

    def forward(self, x):
        if self.token_mixer is not None:
            x = x + self.drop_path1(self.ls1(self.token_mixer(x)))
        return x + self.drop_path2(self.ls2(self.mlp(x)))


class MirrorConvNorm(MirrorInOrder):
    """EfficientFormerV2's own conv-norm pair."""

    children_names = ("conv", "bn")


class MirrorStage(MirrorInOrder):
    """The downsampling (none in the first stage), then the blocks."""

    children_names = ("downsample", "blocks")


EFFICIENTFORMER_V2 = Family(
    name="efficientformer_v2",
    timm_class=EfficientFormerV2,
    mirrors={Stem4: MirrorSequential, ConvNormAct: MirrorConvNormAct, ConvNorm: MirrorConvNorm,
             EfficientFormerV2Stage: MirrorStage, Downsample: MirrorDownsample, EfficientFormerV2Block: MirrorBlock,
             ConvMlpWithNorm: MirrorMlp, LayerScale2d: MirrorLayerScale, Attention2d: MirrorAttention2d,
             Attention2dDownsample: MirrorAttention2dDownsample, LocalGlobalQuery: MirrorLocalGlobalQuery},
    layout=NamedStages(("stem",), ("stages.0", "stages.1", "stages.2", "stages.3"), head=("norm",)),
    check=CheckpointingRefused("stages"),
    input_sizes=own_input_size("biases its attention by offsets on its own input size's maps"),
)
