"""Channel attention (squeeze-excitation, efficient channel attention, HGNet's effective SE,
global context), EfficientViT's linear attention, EdgeNeXt's cross-covariance attention (and its
Fourier position encoding), DaViT's channel group attention, SwiftFormer's additive attention and
MetaFormer's, MobileNetV4's, PVT v2's, Twins' and MobileViT's softmax attention on visible sites only.

timm's modules squeeze each image by its global mean; over a masked image that mean would count
the hidden zeros and leak the mask ratio into every gate (SparK issue #54). Here the mean is
each image's over its visible sites, in both engines: they compute the pooled vector their own
way and share the gate (``ChannelAttention.gates``), which keeps timm's sub-modules and names.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import nullcontext

from timm.layers import EcaModule, EffectiveSEModule, GlobalContext, SEModule
from timm.models._efficientnet_blocks import SqueezeExcite
from timm.models.hgnet import EseModule
from timm.models.edgenext import PositionalEncodingFourier
from timm.models.fastvit import Attention as FastVitAttention
from timm.models.metaformer import Attention as MetaFormerAttention
from timm.models.senet import SEModule as LegacySEModule
from timm.models.swiftformer import EfficientAdditiveAttention
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .refusals import refuse_dropout, unsupported

ATTENTION = (SEModule, EcaModule, SqueezeExcite, EseModule, EffectiveSEModule, LegacySEModule)
KINDS = {SEModule: "se", EcaModule: "eca", SqueezeExcite: "effnet_se", EseModule: "ese", EffectiveSEModule: "timm_ese",
         LegacySEModule: "legacy_se"}


def adopt_children(twin: nn.Module, module: nn.Module, path: str, kinds: tuple[type, ...]) -> None:
    """Refuse ``module`` unless it is one of ``kinds``; else give ``twin`` a copy of each of its
    children under timm's name (weights map one-to-one)."""
    if type(module) not in kinds:
        raise unsupported(module, path)
    for name, child in module.named_children():
        twin.add_module(name, copy.deepcopy(child))


class ChannelAttention(nn.Module):
    """The gate of a timm SEModule (or the legacy senet module's), EcaModule, EfficientNet
    SqueezeExcite, or effective SE (one 1x1 convolution, no reduction: HGNet's EseModule, timm's
    EffectiveSEModule), applied to a pooled (B, C) vector."""

    def __init__(self, module: nn.Module, path: str):
        super().__init__()
        adopt_children(self, module, path, ATTENTION)
        if getattr(module, "add_maxpool", False):
            raise unsupported(module, path, "add_maxpool (a max over visible sites is not mirrored)")
        self.kind = KINDS[type(module)]
        if self.kind == "eca" and module.conv2 is None:
            self.conv2 = None  # ECA without its MLP: one 1-D convolution

    def gates(self, pooled: Tensor) -> Tensor:
        """(B, C) visible means -> (B, C) gates."""
        if self.kind == "se":
            y = self.fc2(self.act(self.bn(self.fc1(pooled[:, :, None, None]))))
            return self.gate(y).flatten(1)
        if self.kind == "ese":
            return self.sigmoid(self.conv(pooled[:, :, None, None])).flatten(1)
        if self.kind == "timm_ese":
            return self.gate(self.fc(pooled[:, :, None, None])).flatten(1)
        if self.kind == "legacy_se":  # the senet module's: fc1, relu, fc2, sigmoid
            return self.sigmoid(self.fc2(self.relu(self.fc1(pooled[:, :, None, None])))).flatten(1)
        if self.kind == "effnet_se":
            y = self.conv_expand(self.act1(self.conv_reduce(pooled[:, :, None, None])))
            return self.gate(y).flatten(1)
        y = self.conv(pooled[:, None, :])
        if self.conv2 is not None:
            y = self.conv2(self.act(y))
        return self.gate(y).flatten(1)


class GlobalContextAttention(nn.Module):
    """timm's GlobalContext (GCNet) with its context pooled over each image's visible sites: a
    softmax of ``conv_attn``'s logits over them (or, without it, their mean) weights the rows;
    the context then scales the rows by ``gate(mlp_scale(.))`` and/or shifts them by
    ``mlp_add(.)``, per image and channel. Engines pool their own way (a softmax over the visible
    rows, or over the map with hidden logits at -inf) and share ``scale_and_shift``; timm's
    sub-modules keep their names."""

    def __init__(self, module: GlobalContext, path: str):
        super().__init__()
        adopt_children(self, module, path, (GlobalContext,))
        for name in ("conv_attn", "mlp_add", "mlp_scale"):
            if getattr(module, name) is None:
                setattr(self, name, None)

    def scale_and_shift(self, context: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """(B, C) context -> (B, C) scales and (B, C) shifts (None where the module has none)."""
        c = context[:, :, None, None]
        scale = None if self.mlp_scale is None else self.gate(self.mlp_scale(c)).flatten(1)
        shift = None if self.mlp_add is None else self.mlp_add(c).flatten(1)
        return scale, shift


class LinearAttention(nn.Module):
    """EfficientViT's lightweight attention (timm's ``LiteMLA`` after its multi-scale q, k, v): per
    head of ``dim`` channels, relu(q) times the sum over the image's tokens of relu(k)^T [v, 1], its
    last column dividing the rest (+ ``eps``); in float32, autocast off, as timm's. Linear in the
    tokens, so a token that is zero adds nothing: over an image's visible tokens it is exactly the
    attention of the visible part (hidden tokens hold zeros in both engines), canvas-invariant. A
    leaf every engine converts to its own twin; ``attend`` is the computation they share."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.dim, self.eps = dim, eps

    def attend(self, tokens: Tensor) -> Tensor:
        """(B, n, heads * 3 * dim) tokens, each head's q, k, v side by side -> (B, n, heads * dim)."""
        b, n, c = tokens.shape
        device = tokens.device.type  # ``meta`` (the device audit) has no autocast to turn off
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
            q, k, v = tokens.float().view(b, n, -1, 3 * self.dim).split(self.dim, dim=-1)
            q, k = torch.relu(q), torch.relu(k)
            v = torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], dim=-1)
            kv = torch.einsum("bnhd,bnhe->bhde", k, v)
            out = torch.einsum("bnhd,bhde->bnhe", q, kv)
            out = out[..., :-1] / (out[..., -1:] + self.eps)
        return out.reshape(b, n, -1).to(tokens.dtype)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        return self.attend(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"


class AbsolutePositions(nn.Module):
    """A learned position embedding added at every site (Hiera's ``pos_embed``), made for the map of
    the model's own input size: its (C, h, w) table comes with the features (the family's parameters
    under timm's names, or computed from them) and must be the whole images' map, as in timm; or
    made for any map, a function of its (h, w) (SAM 2's, resized). A parameter-free leaf every engine
    converts to its own twin."""

    @staticmethod
    def checked(table: Tensor | Callable[[int, int], Tensor], h: int, w: int) -> Tensor:
        """The (C, h, w) table of an h x w map: ``table``, refused in one line unless it is made for
        that map, or what ``table(h, w)`` makes."""
        if callable(table):
            return table(h, w)
        if tuple(table.shape[1:]) != (h, w):
            raise ValueError(f"the position embedding is made for maps of {table.shape[1]}x{table.shape[2]} sites, "
                             f"got {h}x{w}; use the model's own input size")
        return table

    def forward(self, x: Tensor, table: Tensor | Callable[[int, int], Tensor]) -> Tensor:
        return x + self.checked(table, *x.shape[-2:])


class CrossCovarianceAttention(nn.Module):
    """EdgeNeXt's transposed attention (timm's ``CrossCovarianceAttn`` after its qkv projection):
    per head, each channel of q attends to the channels of k, the logits the cosines of their
    columns over the image's tokens times a learned per-head ``temperature``, and mixes v's channels
    at every token. A token that is zero adds nothing to the sums and gets zero: over an image's
    visible tokens (hidden ones zero in both engines) it is exactly the attention of the visible
    part, canvas-invariant. A parameter-free leaf every engine converts to its own twin (the
    temperature is its block's, under timm's name)."""

    def __init__(self, num_heads: int):
        super().__init__()
        self.num_heads = num_heads

    def attend(self, tokens: Tensor, temperature: Tensor) -> Tensor:
        """(B, n, 3 * C) each token's q, k, v (head after head within each), (heads, 1, 1) -> (B, n, C)."""
        b, n, _ = tokens.shape
        q, k, v = tokens.view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 4, 1)  # (B, heads, C / heads, n)
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * temperature
        return (logits.softmax(-1) @ v).permute(0, 3, 1, 2).reshape(b, n, -1)

    def forward(self, x: Tensor, temperature: Tensor) -> Tensor:
        b, _, h, w = x.shape
        return self.attend(x.flatten(2).transpose(1, 2), temperature).transpose(1, 2).reshape(b, -1, h, w)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"


class ChannelGroupAttention(nn.Module):
    """DaViT's channel group attention after its qkv projection: per head, a softmax over channels of
    a sum over the image's tokens, mixing each token's channels. timm's ``ChannelAttention``: the
    sums of k scaled by head_dim^-1/2 times v, mixing q; Florence-2's ``ChannelAttentionV2``
    (``v2``): the sums of q times k, mixing v, q scaled by n^-1/2 for n tokens (``dynamic_scale``;
    timm's n is the whole map's, here the image's visible tokens, the same with nothing hidden). A
    token that is zero adds nothing to the sums and gets zero; over an image's visible tokens (hidden
    ones zero in both engines) it is the attention of the visible part. A parameter-free leaf every
    engine converts to its own twin."""

    def __init__(self, num_heads: int, head_dim: int, v2: bool = False, dynamic_scale: bool = False):
        super().__init__()
        self.num_heads, self.head_dim, self.v2, self.dynamic_scale = num_heads, head_dim, v2, dynamic_scale

    def attend(self, tokens: Tensor, count: Tensor) -> Tensor:
        """(B, n, 3 * C) each token's q, k, v (head after head within each), (B,) each image's
        tokens -> (B, n, C)."""
        b, n, _ = tokens.shape
        q, k, v = tokens.view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, heads, n, d)
        if not self.v2:
            q, k, v = k * self.head_dim ** -0.5, v, q  # timm's: k^T v mixes q
        elif self.dynamic_scale:  # timm's Python float n ** -0.5, rounded to the tokens' dtype
            q = q * count.to(torch.float64).pow(-0.5).to(q.dtype)[:, None, None, None]
        else:
            q = q * self.head_dim ** -0.5
        mix = (q.transpose(-1, -2) @ k).softmax(-1)
        return (v @ mix.transpose(-1, -2)).transpose(1, 2).reshape(b, n, -1)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        count = torch.full((b,), h * w, device=x.device)
        return self.attend(x.flatten(2).transpose(1, 2), count).transpose(1, 2).reshape(b, -1, h, w)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, v2={self.v2}, "
                f"dynamic_scale={self.dynamic_scale}")


class FourierPositions(nn.Module):
    """EdgeNeXt's absolute position encoding (timm's ``PositionalEncodingFourier``): sines and
    cosines of each site's row and column, counted from 1 and scaled to (0, 2 pi] over the map,
    projected by a 1x1 convolution (``token_projection``, under timm's name) and added to every
    site. The map is the whole images' map at the layer's stride, so an image in a larger canvas
    gets other positions, as it does in timm. Computed on the features' device in timm's float32
    order (timm's builds its grid on the CPU); engines add it to their sites their own way."""

    def __init__(self, module: nn.Module, path: str):
        super().__init__()
        adopt_children(self, module, path, (PositionalEncodingFourier,))
        self.hidden_dim, self.temperature, self.scale = module.hidden_dim, module.temperature, module.scale

    def encoding(self, h: int, w: int) -> Tensor:
        """(C, h, w): the encoding of every site of an h x w map."""
        weight = self.token_projection.weight
        eps = 1e-6  # timm's, in each denominator
        rows = torch.arange(1, h + 1, device=weight.device, dtype=torch.float32)
        cols = torch.arange(1, w + 1, device=weight.device, dtype=torch.float32)
        y = (rows / (rows[-1:] + eps) * self.scale)[:, None].expand(h, w)
        x = (cols / (cols[-1:] + eps) * self.scale)[None, :].expand(h, w)
        dim_t = torch.arange(self.hidden_dim, device=weight.device, dtype=torch.int64).to(torch.float32)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.hidden_dim)
        pos = [torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=3).flatten(2)
               for p in (y[..., None] / dim_t, x[..., None] / dim_t)]
        return self.token_projection(torch.cat(pos, dim=2).permute(2, 0, 1)[None].to(weight.dtype))[0]

    def forward(self, x: Tensor) -> Tensor:
        return x + self.encoding(*x.shape[-2:])


class AdditiveAttention(nn.Module):
    """SwiftFormer's efficient additive attention with its sums over each image's visible tokens:
    q and k are each token's normalised projections; a = q w_g / sqrt(d), normalised over the
    image's tokens, pools q into one global query g = sum(a q); the output is final(proj(g k) + q).
    timm sums over every token of the map; a hidden token would bring its projections' biases
    into both sums, so here it brings nothing (engines leave it out their own way). timm's
    sub-modules and ``w_g`` keep their names."""

    def __init__(self, module: EfficientAdditiveAttention, path: str):
        super().__init__()
        adopt_children(self, module, path, (EfficientAdditiveAttention,))
        self.w_g = nn.Parameter(module.w_g.detach().clone())
        self.scale_factor = module.scale_factor

    def query_and_key(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Each token's normalised query and key."""
        return F.normalize(self.to_query(tokens), dim=-1), F.normalize(self.to_key(tokens), dim=-1)

    def output(self, query: Tensor, key: Tensor, pooled: Tensor) -> Tensor:
        """final(proj(g k) + q), ``pooled`` g given per token."""
        return self.final(self.proj(pooled * key) + query)


# timm's multi-head self-attention modules of convnet families (qkv and proj linear layers, no position bias)
SELF_ATTENTION = (MetaFormerAttention, FastVitAttention)


def attend_heads(q: Tensor, k: Tensor, v: Tensor, keys: Tensor) -> Tensor:
    """(B, heads, n, d) queries, (B, heads, m, d) keys and values, (B, m) bool: which keys count (an
    image without one lets every key, so that no softmax is empty) -> (B, n, heads * d), head after head."""
    keys = keys | ~keys.any(1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :])
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


class SelfAttention(nn.Module):
    """Multi-head softmax self-attention over each image's visible tokens (CAFormer's and
    FastViT's last stages): every visible token attends to the visible tokens of its image only.
    Over the visible part this is timm's attention of a smaller image: no hidden
    token is a key, so nothing of the hidden area or of the mask ratio reaches a feature (canvas
    invariance), as the paper's sparse convolutions promise and MAE's encoder does for ViTs.
    timm's ``qkv`` and ``proj`` keep their names; engines gather the tokens their own way."""

    def __init__(self, module: nn.Module, path: str):
        super().__init__()
        if type(module) not in SELF_ATTENTION:
            raise unsupported(module, path)
        refuse_dropout(module, path, "attn_drop", "proj_drop")
        self.qkv, self.proj = copy.deepcopy(module.qkv), copy.deepcopy(module.proj)
        self.num_heads, self.head_dim = module.num_heads, module.head_dim

    def attend(self, tokens: Tensor, keys: Tensor) -> Tensor:
        """(B, n, C) tokens, (B, n) bool: which of them are keys (an image without one lets every
        token be, so that no softmax is empty) -> (B, n, C), each token's attention output."""
        b, n, _ = tokens.shape
        q, k, v = self.qkv(tokens).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.proj(attend_heads(q, k, v, keys))


class GroupedQueryAttention(nn.Module):
    """Softmax attention after its projections, ``num_heads`` query heads of ``key_dim`` channels
    sharing ``kv_heads`` key and value heads (a divisor of ``num_heads``), which may come from a
    coarser map: MobileNetV4's multi-query attention (timm's ``MultiQueryAttention2d``: one key and
    value head, after a strided depthwise convolution where ``kv_stride`` > 1) and PVT v2's
    spatial-reduction attention (a key and value head per query head, from the 32-pixel patches).
    Each visible query attends to its image's visible keys only, as ``SelfAttention``; a
    parameter-free leaf every engine converts to its own twin (the projections are the block's
    converted modules)."""

    def __init__(self, num_heads: int, key_dim: int, value_dim: int, kv_heads: int = 1):
        super().__init__()
        if num_heads % kv_heads:
            raise ValueError(f"kv_heads {kv_heads} does not divide num_heads {num_heads}")
        self.num_heads, self.key_dim, self.value_dim, self.kv_heads = num_heads, key_dim, value_dim, kv_heads

    def attend(self, q: Tensor, k: Tensor, v: Tensor, keys: Tensor) -> Tensor:
        """(B, n, heads * key_dim) queries, (B, m, kv_heads * key_dim) keys, (B, m, kv_heads * value_dim)
        values, (B, m) bool: which keys count (an image without one lets every key) -> (B, n, heads * value_dim)."""
        b, n, _ = q.shape
        m = k.shape[1]
        q = q.view(b, n, self.num_heads, self.key_dim).transpose(1, 2)
        k = k.view(b, m, self.kv_heads, self.key_dim).transpose(1, 2)
        v = v.view(b, m, self.kv_heads, self.value_dim).transpose(1, 2)
        if 1 < self.kv_heads < self.num_heads:  # one head broadcasts, as many heads pair up
            k, v = (t.repeat_interleave(self.num_heads // self.kv_heads, dim=1) for t in (k, v))
        return attend_heads(q, k, v, keys)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        b, _, h, w = q.shape
        tokens = [t.flatten(2).transpose(1, 2) for t in (q, k, v)]
        keys = k.new_ones(k.shape[0], tokens[1].shape[1], dtype=torch.bool)
        return self.attend(*tokens, keys).transpose(1, 2).reshape(b, -1, h, w)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, key_dim={self.key_dim}, value_dim={self.value_dim}, "
                f"kv_heads={self.kv_heads}")


class PackedQkvAttention(GroupedQueryAttention):
    """Softmax attention from one map of each head's query, key and value channels in turn (CPUBone's
    ``ConvAttention``: a 1x1 convolution to heads x (q, k, v) x ``head_dim`` channels, the output head
    after head): each visible query attends to its image's visible keys. A parameter-free leaf every
    engine converts to its own twin."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__(num_heads, head_dim, head_dim, num_heads)

    def attend_packed(self, qkv: Tensor, keys: Tensor) -> Tensor:
        """(B, n, heads * 3 * head_dim) tokens, (B, n) bool: which are keys -> (B, n, heads * head_dim)."""
        b, n, _ = qkv.shape
        q, k, v = qkv.view(b, n, self.num_heads, 3, self.key_dim).permute(3, 0, 2, 1, 4)
        return attend_heads(q, k, v, keys)

    def forward(self, qkv: Tensor) -> Tensor:
        b, _, h, w = qkv.shape
        keys = qkv.new_ones(b, h * w, dtype=torch.bool)
        return self.attend_packed(qkv.flatten(2).transpose(1, 2), keys).transpose(1, 2).reshape(b, -1, h, w)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.key_dim}"


class MaskUnitAttention(GroupedQueryAttention):
    """Hiera's attention after its qkv projection (timm's ``MaskUnitAttention``: q, k, v each head
    after head), its queries max-pooled over 2x2 sites where the block pools: each query attends to
    the keys of its mask unit, ``unit`` x ``unit`` key sites laid from the map's corner (Hiera's: the
    mask's 32-pixel patch at every stride; SAM 2's windows: also several patches), or with ``unit``
    None to those of its whole image. Each visible query attends to the visible keys only. A
    parameter-free leaf every engine converts to its own twin."""

    def __init__(self, num_heads: int, head_dim: int, unit: int | None):
        super().__init__(num_heads, head_dim, head_dim, num_heads)
        self.unit = unit

    def like(self, cls: type) -> "MaskUnitAttention":
        return cls(self.num_heads, self.key_dim, self.unit)

    def attend_map(self, q: Tensor, k: Tensor, v: Tensor, keys: Tensor) -> Tensor:
        """(B, C, h, w) queries, (B, C, hk, wk) keys and values (hk = h or 2h), (B, hk, wk) bool:
        which keys count -> (B, C', h, w)."""
        b, _, h, w = q.shape
        self.check(*k.shape[-2:])
        if self.unit is None:
            tokens = [t.flatten(2).transpose(1, 2) for t in (q, k, v)]
            return self.attend(*tokens, keys.flatten(1)).transpose(1, 2).reshape(b, -1, h, w)
        sides = (self.unit * h // k.shape[-2], self.unit, self.unit)
        tokens = [units(t, s) for t, s in zip((q, k, v), sides)]
        out = self.attend(*tokens, units(keys[:, None], self.unit)[..., 0])
        return out.reshape(b, h // sides[0], w // sides[0], sides[0], sides[0], -1).permute(0, 5, 1, 3, 2, 4).reshape(
            b, -1, h, w)

    def check(self, h: int, w: int) -> None:
        """Refuse, in one line, keys on a map that is not whole units."""
        if self.unit is not None and (h % self.unit or w % self.unit):
            raise ValueError(f"attention within units of {self.unit}x{self.unit} sites needs maps of whole units, got "
                             f"{h}x{w}; use an input size that makes them")

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.attend_map(q, k, v, k.new_ones(k.shape[0], *k.shape[-2:], dtype=torch.bool))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.key_dim}, unit={self.unit}"


def map_tokens(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, C, h, w) -> its sites as tokens (B, h * w, C), row by row, and each one's row and column (B, h * w)."""
    b, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    return x.flatten(2).transpose(1, 2), ys.reshape(1, -1).expand(b, -1), xs.reshape(1, -1).expand(b, -1)


def units(x: Tensor, side: int) -> Tensor:
    """(B, C, h, w) -> (B * units, side * side, C): the sites of each side x side unit row by row."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // side, side, w // side, side).permute(0, 2, 4, 3, 5, 1).reshape(-1, side * side, c)


class WindowAttention(nn.Module):
    """Attention within groups of ``window`` x ``window`` sites after the q, k, v projection: Twins'
    locally-grouped self-attention (timm's ``LocallyGroupedAttn``: every head's q, then k, then v)
    and TinyViT's (``per_head``: each head's q, k, v side by side, values ``value_dim`` wide, and a
    learned bias per relative offset) and Swin's (``shift``: the groups' grid starts ``shift`` sites
    in from the top-left corner, the sites before it in groups of their own: Swin's shifted windows,
    whose cyclic roll timm masks so that wrapped-around sites never meet; Swin V2's cosine attention
    where a ``logit_scale`` is given, its q, k, v bias added first). The map, padded to whole
    groups laid from its top-left corner (after the shift), attends within each group. Here each
    visible token attends to its group's visible tokens only: the padding and the hidden tokens are
    no keys (timm lets its padding's projections be keys; on maps of whole groups, as at 224 px,
    there is none). The output is head after head, or with ``heads_inner`` each channel of every
    head in turn (NesT's: channel d of head h at d * heads + h). A parameter-free leaf every engine
    converts to its own twin; ``attend`` groups the whole images' map (the dense-masked engine's
    layout), ``attend_groups`` attends within groups however an engine laid them out (the sparse
    engine scatters its rows into them)."""

    def __init__(self, num_heads: int, key_dim: int, value_dim: int, window: int, per_head: bool = False,
                 shift: int = 0, heads_inner: bool = False):
        super().__init__()
        if not per_head and key_dim != value_dim:
            raise ValueError(f"q, k, v laid out head after head need key_dim == value_dim, got {key_dim}, {value_dim}")
        if not 0 <= shift < window:
            raise ValueError(f"a shift of {shift} sites for groups of {window}: it must be in [0, {window})")
        self.num_heads, self.key_dim, self.value_dim, self.window = num_heads, key_dim, value_dim, window
        self.per_head, self.shift, self.heads_inner = per_head, shift, heads_inner

    def like(self, cls: type) -> "WindowAttention":
        """This attention as ``cls`` (an engine's twin), every setting kept."""
        return cls(self.num_heads, self.key_dim, self.value_dim, self.window, self.per_head, self.shift,
                   self.heads_inner)

    def attend_groups(self, tokens: Tensor, keys: Tensor, bias: Tensor | None = None, qkv_bias: Tensor | None = None,
                      logit_scale: Tensor | None = None) -> Tensor:
        """(G, L, C) each group's tokens' q, k, v, (G, L) bool: which are keys, (G or 1, heads, L, L)
        bias of each query and key or None -> (G, L, heads * value_dim). ``qkv_bias`` (C,) is added
        to every token first; with ``logit_scale`` (heads, 1, 1) the logits are the cosines of
        queries and keys times it (Swin V2's), not their scaled dot products."""
        heads, kd, vd = self.num_heads, self.key_dim, self.value_dim
        if qkv_bias is not None:  # empty slots get it too: they are neither keys nor read
            tokens = tokens + qkv_bias.to(tokens.dtype)
        if self.per_head:
            q, k, v = (t.transpose(1, 2) for t in tokens.unflatten(-1, (heads, -1)).split([kd, kd, vd], dim=-1))
        else:
            q, k, v = tokens.unflatten(-1, (3, heads, kd)).permute(2, 0, 3, 1, 4)
        keys = (keys | ~keys.any(1, keepdim=True))[:, None, None, :]  # a group without a key: outputs never read
        if bias is not None:
            keys = torch.zeros(keys.shape, dtype=q.dtype, device=q.device).masked_fill_(~keys, float("-inf"))
            keys = keys + bias.to(q.dtype)
        scale = None
        if logit_scale is not None:
            q, k, scale = F.normalize(q, dim=-1) * logit_scale.to(q.dtype), F.normalize(k, dim=-1), 1.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, scale=scale)  # (G, heads, L, value_dim)
        return out.permute(0, 2, 3, 1).flatten(2) if self.heads_inner else out.transpose(1, 2).flatten(2)

    def attend(self, qkv: Tensor, present: Tensor, bias: Tensor | None = None, **terms: Tensor | None) -> Tensor:
        """(B, h, w, C) each site's q, k, v, (B, h, w) bool: which sites are keys, (heads, L, L) bias
        of each query and key position in a group (L = window ** 2) or None -> (B, h, w, heads *
        value_dim), every site's attention output; ``terms``: ``attend_groups``'."""
        b, h, w, _ = qkv.shape
        ws, lead = self.window, -self.shift % self.window
        down, right = -(lead + h) % ws, -(lead + w) % ws
        qkv = F.pad(qkv, (0, 0, lead, right, lead, down))
        present = F.pad(present, (lead, right, lead, down))  # padding: no keys
        gh, gw = (lead + h + down) // ws, (lead + w + right) // ws
        groups = qkv.view(b, gh, ws, gw, ws, -1).transpose(2, 3).reshape(b * gh * gw, ws * ws, -1)
        keys = present.view(b, gh, ws, gw, ws).transpose(2, 3).reshape(b * gh * gw, ws * ws)
        out = self.attend_groups(groups, keys, bias, **terms)
        out = out.reshape(b, gh, gw, ws, ws, -1).transpose(2, 3).reshape(b, gh * ws, gw * ws, -1)
        return out[:, lead:lead + h, lead:lead + w]

    def forward(self, x: Tensor, bias: Tensor | None = None, **terms: Tensor | None) -> Tensor:
        b, _, h, w = x.shape
        present = x.new_ones(b, h, w, dtype=torch.bool)
        return self.attend(x.permute(0, 2, 3, 1), present, bias, **terms).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, key_dim={self.key_dim}, value_dim={self.value_dim}, "
                f"window={self.window}, per_head={self.per_head}, shift={self.shift}, heads_inner={self.heads_inner}")


def unfolding_blocks(h: int, w: int, grid: int) -> tuple[int, int]:
    """MobileViT's ``grid`` x ``grid`` blocks of an h x w map, refused in one line where the map is
    no whole number of them (timm resizes such a map bilinearly, which has no sparse twin)."""
    if h % grid or w % grid:
        raise ValueError(f"MobileViT's {grid}x{grid} unfolding needs maps of whole {grid}x{grid} blocks, got {h}x{w} "
                         f"sites (timm resizes such a map); use an input size that is a multiple of {32 * grid}")
    return grid, grid


def spread_blocks(h: int, w: int, grid: int) -> tuple[int, int]:
    """MaxViT's grid: ``grid`` x ``grid`` sites spread evenly over an h x w map are a group, so the
    blocks are (h / grid) x (w / grid); refused in one line where they are not whole (timm asserts)."""
    if h % grid or w % grid:
        raise ValueError(f"MaxViT's grid attention spreads groups of {grid}x{grid} sites over each map, which needs "
                         f"a multiple of {grid} sites a side, got {h}x{w}; use an input size that is a multiple of "
                         f"{32 * grid} (the model's own)")
    return h // grid, w // grid


def grid_groups(x: Tensor, block: tuple[int, int]) -> Tensor:
    """(B, h, w, C) -> (B * bh * bw, h * w / (bh * bw), C): the sites of each image with the same
    offset in their bh x bw ``block``, block after block in rows (MobileViT's unfolding, MaxViT's grid)."""
    b, h, w, c = x.shape
    bh, bw = block
    return x.view(b, h // bh, bh, w // bw, bw, c).permute(0, 2, 4, 1, 3, 5).reshape(b * bh * bw, -1, c)


def grid_sites(groups: Tensor, shape: tuple[int, int, int], block: tuple[int, int]) -> Tensor:
    """``grid_groups``' inverse: (B * bh * bw, h * w / (bh * bw), C) -> (B, h, w, C)."""
    b, h, w = shape
    bh, bw = block
    out = groups.view(b, bh, bw, h // bh, w // bw, -1).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(b, h, w, -1)


class GridAttention(WindowAttention):
    """Attention within strided groups after the q, k, v projection. MobileViT's (timm's ViT
    ``Attention`` on its unfolded map): each site attends to the sites of its image with the same
    offset in their ``grid`` x ``grid`` block. MaxViT's grid attention (``spread``, each head's q,
    k, v side by side where ``per_head``): the group is ``grid`` x ``grid`` sites spread evenly over
    the map (one in each of its grid x grid blocks), with a bias per pair of their places in the grid.
    Here each site attends to the visible ones only (a group spans the whole image: its sites lie
    in different patches). A parameter-free leaf every engine converts to its own twin."""

    def __init__(self, num_heads: int, head_dim: int, grid: int, spread: bool = False, per_head: bool = False):
        super().__init__(num_heads, head_dim, head_dim, grid, per_head=per_head)
        self.spread = spread

    def like(self, cls: type) -> "GridAttention":
        return cls(self.num_heads, self.key_dim, self.window, self.spread, self.per_head)

    def blocks(self, h: int, w: int) -> tuple[int, int]:
        """The blocks whose sites at one offset are a group, on an h x w map (refused in one line
        where the map is no whole number of them)."""
        return (spread_blocks if self.spread else unfolding_blocks)(h, w, self.window)

    def attend(self, qkv: Tensor, present: Tensor, bias: Tensor | None = None, **terms: Tensor | None) -> Tensor:
        """(B, h, w, C) each site's q, k, v, (B, h, w) bool: which sites are keys, (heads, L, L) bias
        of each pair of places in a group or None -> (B, h, w, heads * head_dim)."""
        block = self.blocks(*present.shape[1:])
        keys = grid_groups(present[..., None], block)[..., 0]
        return grid_sites(self.attend_groups(grid_groups(qkv, block), keys, bias, **terms), present.shape, block)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.key_dim}, grid={self.window}, spread={self.spread}, "
                f"per_head={self.per_head}")


class SeparableGridAttention(nn.Module):
    """MobileViT v2's separable self-attention (timm's ``LinearSelfAttention`` after its qkv 1x1):
    within each group of sites of ``GridAttention`` (an image's sites with the same offset in their
    ``grid`` x ``grid`` block), a softmax over the group of each site's score (the first channel)
    weights the keys into one context vector, and each site's output is relu(its value) times it;
    here the softmax runs over the group's visible sites. A parameter-free leaf every engine
    converts to its own twin."""

    def __init__(self, dim: int, grid: int):
        super().__init__()
        self.dim, self.grid = dim, grid

    def blocks(self, h: int, w: int) -> tuple[int, int]:
        """MobileViT's 2x2 (``grid``) blocks, refused in one line on a map of no whole ones."""
        return unfolding_blocks(h, w, self.grid)

    def attend_groups(self, groups: Tensor, keys: Tensor) -> Tensor:
        """(G, L, 1 + 2 * dim) each group's sites' score, key and value, (G, L) bool: which count
        -> (G, L, dim)."""
        score, key, value = groups.split([1, self.dim, self.dim], dim=-1)
        keys = (keys | ~keys.any(1, keepdim=True))[..., None]  # a group without a visible site: outputs never read
        weights = score.masked_fill(~keys, float("-inf")).softmax(1)
        context = (key * weights).sum(1, keepdim=True)
        return torch.relu(value) * context

    def attend(self, qkv: Tensor, present: Tensor) -> Tensor:
        """(B, h, w, 1 + 2 * dim) each site's score, key and value, (B, h, w) bool: which sites
        count -> (B, h, w, dim)."""
        block = self.blocks(*present.shape[1:])
        out = self.attend_groups(grid_groups(qkv, block), grid_groups(present[..., None], block)[..., 0])
        return grid_sites(out, present.shape, block)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        present = x.new_ones(b, h, w, dtype=torch.bool)
        return self.attend(x.permute(0, 2, 3, 1), present).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, grid={self.grid}"


class RelativeLogitsAttention(nn.Module):
    """BotNet's bottleneck attention (timm's ``BottleneckAttn`` after its qkv 1x1: every head's q,
    then k, then v) over each image's tokens, the logits of each query and key plus the query's
    products with learned embeddings of the key's row and column offset from it (``height_rel``,
    ``width_rel``, timm's ``PosEmbedRel``: (2H - 1, key_dim) and (2W - 1, key_dim) for maps of up to
    ``feat`` = (H, W) sites; timm runs the map of that size alone), all scaled where
    ``scale_pos_embed``, else the dot products alone. Here each visible query attends to its image's
    visible keys. A parameter-free leaf every engine converts to its own twin."""

    def __init__(self, num_heads: int, key_dim: int, value_dim: int, feat: tuple[int, int], scale_pos_embed: bool):
        super().__init__()
        self.num_heads, self.key_dim, self.value_dim = num_heads, key_dim, value_dim
        self.feat, self.scale_pos_embed = tuple(feat), scale_pos_embed

    def like(self, cls: type) -> "RelativeLogitsAttention":
        return cls(self.num_heads, self.key_dim, self.value_dim, self.feat, self.scale_pos_embed)

    def check(self, h: int, w: int) -> None:
        """Refuse, in one line, a map larger than the offset tables reach."""
        if h > self.feat[0] or w > self.feat[1]:
            raise ValueError(f"BotNet's relative position embeddings reach maps of up to {self.feat[0]}x{self.feat[1]} "
                             f"sites, got {h}x{w}; use an input size up to the model's own (timm runs that alone)")

    def attend(self, tokens: Tensor, present: Tensor, ys: Tensor, xs: Tensor, height_rel: Tensor,
               width_rel: Tensor) -> Tensor:
        """(B, n, C) each token's q, k, v, (B, n) bool: which are keys, (B, n) each token's row and
        column -> (B, n, heads * value_dim)."""
        heads, kd, vd = self.num_heads, self.key_dim, self.value_dim
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2)
                   for t in tokens.split([heads * kd, heads * kd, heads * vd], dim=-1))
        (h, w), expand = self.feat, (-1, heads, -1, -1)
        rows = (ys[:, None, :] - ys[:, :, None] + h - 1)[:, None].expand(expand)  # the key's offset from the query
        cols = (xs[:, None, :] - xs[:, :, None] + w - 1)[:, None].expand(expand)
        relative = (q @ height_rel.to(q.dtype).t()).gather(-1, rows) + (q @ width_rel.to(q.dtype).t()).gather(-1, cols)
        logits = q @ k.transpose(-1, -2)
        logits = (logits + relative) * kd ** -0.5 if self.scale_pos_embed else logits * kd ** -0.5 + relative
        keys = present | ~present.any(1, keepdim=True)  # an image without a key: outputs never read
        out = logits.masked_fill(~keys[:, None, None, :], float("-inf")).softmax(-1) @ v
        return out.transpose(1, 2).flatten(2)

    def attend_map(self, x: Tensor, present: Tensor, height_rel: Tensor, width_rel: Tensor) -> Tensor:
        """(B, C, h, w) the map's q, k, v, (B, h * w) bool: which sites are keys -> (B, C', h, w)."""
        b, _, h, w = x.shape
        self.check(h, w)
        tokens, ys, xs = map_tokens(x)
        return self.attend(tokens, present, ys, xs, height_rel, width_rel).transpose(1, 2).reshape(b, -1, h, w)

    def forward(self, x: Tensor, height_rel: Tensor, width_rel: Tensor) -> Tensor:
        present = x.new_ones(x.shape[0], x.shape[2] * x.shape[3], dtype=torch.bool)
        return self.attend_map(x, present, height_rel, width_rel)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, key_dim={self.key_dim}, value_dim={self.value_dim}, feat={self.feat}, "
                f"scale_pos_embed={self.scale_pos_embed}")
