"""The dense-masked engine's twins of the attention leaves (attention.py, lambdas.py, byoanet.py,
mvitv2.py, efficientformer_v2.py): each runs over the whole map, hidden sites zeroed first and no
keys, its output masked later, as SparK's dense masking would; ``convert_leaf`` (masked_engine.py)
picks the twin.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..precision import statistics_dtype
from .attention import (AbsolutePositions, AdditiveAttention, ChannelAttention, ChannelGroupAttention,
                        CrossCovarianceAttention, FourierPositions, GlobalContextAttention, GridAttention,
                        GroupedQueryAttention, LinearAttention, MaskUnitAttention, PackedQkvAttention,
                        RelativeLogitsAttention, SelfAttention, SeparableGridAttention, WindowAttention, map_tokens)
from .families.byoanet import HaloAttention
from .families.coat import FactorAttention
from .families.efficientformer_v2 import OffsetBiasAttention
from .families.lambdas import LambdaMixing
from .masked_tensor import MaskedTensor
from .families.mvitv2 import PoolingAttention


def visible_means(inp: MaskedTensor) -> Tensor:
    """(B, C): each image's mean over its visible positions, not over the whole map (in float32
    for 16-bit maps)."""
    x = inp.clean().x
    dtype = statistics_dtype(x.dtype)
    return x.sum((2, 3), dtype=dtype) / inp.visible().sum((2, 3)).to(dtype)


class MaskedChannelAttention(ChannelAttention):
    """SE/ECA with each image's mean over its visible positions."""

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        x = inp.clean().x
        return MaskedTensor(x * self.gates(visible_means(inp))[:, :, None, None], inp.active)


class MaskedGlobalContext(GlobalContextAttention):
    """GCNet's attention with a softmax over each image's visible positions (hidden logits at
    -inf); its shift reaches hidden positions too, and is masked later."""

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        x = inp.clean().x
        dtype = statistics_dtype(x.dtype)
        if self.conv_attn is None:
            context = visible_means(inp)
        else:
            logits = self.conv_attn(x).to(dtype).masked_fill(~inp.visible(), float("-inf"))
            weights = logits.flatten(1).softmax(-1)  # (B, H * W)
            context = torch.einsum("bcn,bn->bc", x.flatten(2).to(dtype), weights)
        scale, shift = self.scale_and_shift(context)
        y = x if scale is None else x * scale[:, :, None, None]  # promoted, as the sparse engine's ImageScale
        if shift is None:
            return MaskedTensor(y, inp.active)
        return MaskedTensor(y + shift.to(y.dtype)[:, :, None, None], inp.active, dirty=True)


class MaskedLinearAttention(LinearAttention):
    """The attention over the masked map: hidden tokens hold zeros, so they add nothing, and come
    out as zeros (relu(q) = 0 there)."""

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        return MaskedTensor(super().forward(inp.clean().x), inp.active)


class MaskedRelativeLogitsAttention(RelativeLogitsAttention):
    """BotNet's attention over the map's sites, the hidden ones no keys; hidden queries get values,
    masked later."""

    def forward(self, inp: MaskedTensor, height_rel: Tensor, width_rel: Tensor) -> MaskedTensor:
        out = self.attend_map(inp.clean().x, inp.visible()[:, 0].flatten(1), height_rel, width_rel)
        return MaskedTensor(out, inp.active, dirty=True)


class MaskedHaloAttention(HaloAttention):
    """Halo attention over every block of the map, the hidden keys left out; hidden queries get
    values, masked later."""

    def forward(self, q: MaskedTensor, kv: MaskedTensor, height_rel: Tensor, width_rel: Tensor) -> MaskedTensor:
        out = self.attend(q.clean().x, kv.clean().x, kv.visible()[:, 0], height_rel, width_rel)
        return MaskedTensor(out, q.active, dirty=True)


class MaskedLambdaMixing(LambdaMixing):
    """The lambda layer's mixing over the map's sites, the hidden ones no tokens of the image (their
    v zero); hidden sites get values, masked later."""

    def forward(self, inp: MaskedTensor, pos_emb: Tensor | None = None) -> MaskedTensor:
        out = self.mix_map(inp.clean().x, inp.visible()[:, 0].flatten(1), pos_emb)
        return MaskedTensor(out, inp.active, dirty=True)


class MaskedCrossCovarianceAttention(CrossCovarianceAttention):
    """The attention over the map's tokens, the hidden ones zeroed first: they add nothing to the
    sums and come out as zeros."""

    def forward(self, inp: MaskedTensor, temperature: Tensor) -> MaskedTensor:
        return MaskedTensor(super().forward(inp.clean().x, temperature), inp.active)


class MaskedChannelGroupAttention(ChannelGroupAttention):
    """The attention over the map's tokens, the hidden ones zeroed first (they add nothing to the
    sums and come out as zeros); an image's tokens are its visible ones."""

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        x = inp.clean().x
        b, _, h, w = x.shape
        out = self.attend(x.flatten(2).transpose(1, 2), inp.visible().flatten(1).sum(1))
        return MaskedTensor(out.transpose(1, 2).reshape(b, -1, h, w), inp.active)


class MaskedFourierPositions(FourierPositions):
    """The encoding added at every site of the map, hidden ones too (masked later)."""

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        return MaskedTensor(super().forward(inp.x), inp.active, dirty=True)


class MaskedAdditiveAttention(AdditiveAttention):
    """SwiftFormer's attention as timm computes it over the map's tokens, the queries of hidden
    ones zeroed first, so that neither sum sees them; its output's biases reach hidden sites."""

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        x = inp.clean().x
        b, c, h, w = x.shape
        query, key = self.query_and_key(x.flatten(2).transpose(1, 2))
        query = query * inp.visible().flatten(2).transpose(1, 2).to(query.dtype)
        a = F.normalize(query @ self.w_g * self.scale_factor, dim=1)
        pooled = torch.sum(a * query, dim=1, keepdim=True)
        out = self.output(query, key, pooled)
        return MaskedTensor(out.transpose(1, 2).reshape(b, -1, h, w), inp.active, dirty=True)


class MaskedSelfAttention(SelfAttention):
    """The attention over every token of the map with the hidden ones left out as keys (SparK's
    masking applied to attention); hidden tokens, as queries, get values, masked later."""

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        x = inp.clean().x
        b, c, h, w = x.shape
        out = self.attend(x.flatten(2).transpose(1, 2), inp.visible().flatten(1))
        return MaskedTensor(out.transpose(1, 2).reshape(b, -1, h, w), inp.active, dirty=True)


class MaskedFactorAttention(FactorAttention):
    """CoaT's factorised attention over every token of the map and the class token, the hidden
    tokens left out as keys; hidden tokens, as queries, get values, masked later."""

    def forward(self, inp: MaskedTensor, cls: Tensor) -> tuple[MaskedTensor, Tensor]:
        x = inp.clean().x
        b, c, h, w = x.shape
        out, out_cls = self.attend(x.flatten(2).transpose(1, 2), inp.visible().flatten(1), cls)
        return MaskedTensor(out.transpose(1, 2).reshape(b, -1, h, w), inp.active, dirty=True), out_cls


class MaskedGroupedQueryAttention(GroupedQueryAttention):
    """The attention over every query of the map, the hidden keys (at the keys' resolution) left
    out; hidden queries get values, masked later."""

    def forward(self, q: MaskedTensor, k: MaskedTensor, v: MaskedTensor) -> MaskedTensor:
        qx, kx, vx = q.clean().x, k.clean().x, v.clean().x
        b, _, h, w = qx.shape
        tokens = [t.flatten(2).transpose(1, 2) for t in (qx, kx, vx)]
        out = self.attend(*tokens, k.visible().flatten(1))
        return MaskedTensor(out.transpose(1, 2).reshape(b, -1, h, w), q.active, dirty=True)


class MaskedPoolingAttention(PoolingAttention):
    """MViTv2's attention over every query of the map, the hidden keys (at the keys' resolution)
    left out; hidden queries get values, masked later."""

    def forward(self, q: MaskedTensor, k: MaskedTensor, v: MaskedTensor, rel_h: Tensor | None,
                rel_w: Tensor | None, cls: tuple[Tensor, Tensor, Tensor] | None = None):
        q_map, k_map = q.clean().x, k.clean().x
        b, _, h, w = q_map.shape
        (queries, qy, qx), (keys, ky, kx) = map_tokens(q_map), map_tokens(k_map)
        out = self.attend(queries, keys, map_tokens(v.clean().x)[0], k.visible().flatten(1), (qy, qx), (ky, kx),
                          (h, w), tuple(k_map.shape[-2:]), rel_h, rel_w, cls)
        out, out_cls = (out, None) if cls is None else out
        out = MaskedTensor(out.transpose(1, 2).reshape(b, -1, h, w), q.active, dirty=True)
        return out if cls is None else (out, out_cls)


class MaskedOffsetBiasAttention(OffsetBiasAttention):
    """EfficientFormerV2's attention over every query of the map, the hidden keys (at the keys'
    resolution) left out; hidden queries get values, masked later."""

    def forward(self, q: MaskedTensor, k: MaskedTensor, v: MaskedTensor, biases: Tensor,
                heads_before: nn.Module | None = None, heads_after: nn.Module | None = None) -> MaskedTensor:
        q_map, k_map = q.clean().x, k.clean().x
        b, _, h, w = q_map.shape
        self.check(*k_map.shape[-2:])
        (queries, qy, qx), (keys, ky, kx) = map_tokens(q_map), map_tokens(k_map)
        out = self.attend(queries, keys, map_tokens(v.clean().x)[0], k.visible().flatten(1), (qy, qx), (ky, kx),
                          biases, heads_before, heads_after)
        return MaskedTensor(out.transpose(1, 2).reshape(b, -1, h, w), q.active, dirty=True)


class MaskedPackedQkvAttention(PackedQkvAttention):
    """CPUBone's packed heads over every token of the map, the hidden ones left out as keys; hidden
    queries get values, masked later."""

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        x = inp.clean().x
        b, _, h, w = x.shape
        out = self.attend_packed(x.flatten(2).transpose(1, 2), inp.visible().flatten(1))
        return MaskedTensor(out.transpose(1, 2).reshape(b, -1, h, w), inp.active, dirty=True)


class MaskedMaskUnitAttention(MaskUnitAttention):
    """Hiera's attention over every query of the map, the hidden keys left out; hidden queries get
    values, masked later."""

    def forward(self, q: MaskedTensor, k: MaskedTensor, v: MaskedTensor) -> MaskedTensor:
        out = self.attend_map(q.clean().x, k.clean().x, v.clean().x, k.visible()[:, 0])
        return MaskedTensor(out, q.active, dirty=True)


class MaskedAbsolutePositions(AbsolutePositions):
    """The embedding added at every site of the map, hidden ones too (masked later)."""

    def forward(self, inp: MaskedTensor, table: Tensor | Callable[[int, int], Tensor]) -> MaskedTensor:
        return MaskedTensor(super().forward(inp.x, table), inp.active, dirty=True)


class MaskedWindowAttention(WindowAttention):
    """timm's attention within groups of sites over the map, the hidden sites (and the padding)
    left out as keys; hidden queries get values, masked later."""

    def forward(self, inp: MaskedTensor, bias: Tensor | None = None, **terms: Tensor | None) -> MaskedTensor:
        out = self.attend(inp.clean().x.permute(0, 2, 3, 1), inp.visible()[:, 0], bias, **terms)
        return MaskedTensor(out.permute(0, 3, 1, 2), inp.active, dirty=True)


class MaskedGridAttention(GridAttention, MaskedWindowAttention):
    """MobileViT's attention over the map's groups of every other site (``MaskedWindowAttention``'s
    forward), hidden sites no keys; hidden queries get values, masked later."""


class MaskedSeparableGridAttention(SeparableGridAttention):
    """MobileViT v2's separable attention over the map's groups, the hidden sites' scores left out
    of each softmax; hidden sites get values, masked later."""

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        out = self.attend(inp.clean().x.permute(0, 2, 3, 1), inp.visible()[:, 0])
        return MaskedTensor(out.permute(0, 3, 1, 2), inp.active, dirty=True)
