"""The sparse engine's twins of the attention leaves (attention.py, lambdas.py, byoanet.py,
mvitv2.py, efficientformer_v2.py): gates and pooled contexts from each image's visible rows, and
attention over tokens laid out from the rows: each image's rows side by side, or each group's
(windows, grids). Keys are visible sites only, and so are queries but where groups straddle
patches (halo attention's blocks, some windows): there hidden queries are computed, never read.
``convert_leaf`` (sparse_engine.py) picks the twin.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..precision import statistics_dtype
from ..sparse import ME  # the engine package: MinkowskiEngine, its CPU_ONLY note silenced
from ..sparse.patch_conv import from_canvas, to_canvas
from ..sparse.patch_sites import PatchSites
from ..sparse.rowwise import ImageScale, image_of_rows, same_sites, with_features
from .attention import (AbsolutePositions, AdditiveAttention, ChannelAttention, ChannelGroupAttention,
                        CrossCovarianceAttention, FourierPositions, GlobalContextAttention, GridAttention,
                        GroupedQueryAttention, LinearAttention, MaskUnitAttention, PackedQkvAttention,
                        RelativeLogitsAttention, SelfAttention, SeparableGridAttention, WindowAttention)
from .families.byoanet import HaloAttention, grid_sites
from .families.coat import FactorAttention
from .families.efficientformer_v2 import OffsetBiasAttention
from .families.lambdas import LambdaMixing
from .families.mvitv2 import PoolingAttention


def visible_means(x: ME.SparseTensor) -> Tensor:
    """(B, C): each image's mean over its visible rows (in float32 for 16-bit rows)."""
    sites = PatchSites.of(x)
    dtype = statistics_dtype(x.F.dtype)
    sums = x.F.new_zeros(sites.batch, x.F.shape[1], dtype=dtype).index_add_(0, image_of_rows(x), x.F.to(dtype))
    return sums / sites.mean_divisors(x.tensor_stride[0]).to(dtype)[:, None]


class SparseChannelAttention(ChannelAttention):
    """SE/ECA: each image's mean over its visible rows, a gate per image and channel."""

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        gates = self.gates(visible_means(x))
        return with_features(x, ImageScale.apply(x.F, gates, image_of_rows(x)))


class SparseGlobalContext(GlobalContextAttention):
    """GCNet's attention: the context a softmax-weighted sum of each image's visible rows."""

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        sites = PatchSites.of(x)
        image, dtype = image_of_rows(x), statistics_dtype(x.F.dtype)
        if self.conv_attn is None:
            context = visible_means(x)
        else:
            logits = F.linear(x.F, self.conv_attn.weight.flatten(1), self.conv_attn.bias).squeeze(1).to(dtype)
            # a softmax per image over its rows (each image's largest logit subtracted: no overflow)
            top = logits.new_full((sites.batch,), float("-inf")).scatter_reduce(0, image, logits.detach(), "amax")
            e = (logits - top.index_select(0, image)).exp()
            weights = e / e.new_zeros(sites.batch).index_add(0, image, e).index_select(0, image)
            context = x.F.new_zeros(sites.batch, x.F.shape[1], dtype=dtype).index_add(
                0, image, x.F.to(dtype) * weights[:, None])
        scale, shift = self.scale_and_shift(context)
        out = x.F if scale is None else ImageScale.apply(x.F, scale, image)
        if shift is not None:
            out = out + shift.to(out.dtype).index_select(0, image)
        return with_features(x, out)


class SparseLinearAttention(LinearAttention):
    """The attention over each image's visible rows: the rows scattered into the image's token grid
    at their stride (zeros elsewhere, which add nothing), attended there, gathered back. On the grid
    the sums run over timm's token order, which matters: timm attends in float32 even for float64
    maps, and the image's rows side by side would round otherwise (1e-7 apart)."""

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        return on_canvas_sites(x, lambda canvas, present: self.attend(canvas.flatten(1, 2)).view(*canvas.shape[:3], -1))


class SparseAdditiveAttention(AdditiveAttention):
    """SwiftFormer's attention with its two sums (the norm of a, the pooled query) taken per image
    over its visible rows (in float32 for 16-bit rows)."""

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        batch, image = PatchSites.of(x).batch, image_of_rows(x)
        query, key = self.query_and_key(x.F)
        a = query @ self.w_g * self.scale_factor  # (N, 1)
        dtype = statistics_dtype(a.dtype)
        norm = a.new_zeros(batch, 1, dtype=dtype).index_add_(0, image, a.to(dtype).square()).sqrt()
        a = a / norm.clamp_min(1e-12).index_select(0, image).to(a.dtype)  # F.normalize over the tokens
        pooled = query.new_zeros(batch, query.shape[1], dtype=dtype).index_add_(0, image, (a * query).to(dtype))
        return with_features(x, self.output(query, key, pooled.to(query.dtype).index_select(0, image)))


def into_slots(rows: Tensor, slots: Tensor, present: Tensor) -> Tensor:
    """(N, C) rows laid into their ``slots`` of a (G, n) grid of tokens (``present``'s shape), zeros
    in the empty ones -> (G, n, C)."""
    return rows.new_zeros(present.numel(), rows.shape[1]).index_copy(0, slots, rows).view(*present.shape, -1)


def from_slots(x: ME.SparseTensor, out: Tensor, slots: Tensor) -> ME.SparseTensor:
    """``into_slots``' inverse for an attention's (G, n, C') output: ``x``'s rows with its features."""
    return with_features(x, out.reshape(-1, out.shape[-1]).index_select(0, slots))


def bias_at(bias: Tensor, places: Tensor) -> Tensor:
    """(heads, L, L) bias of each pair of places in a group, (G, n) each token's place -> (G, heads,
    n, n): the bias of each pair of tokens."""
    return bias[:, places[:, :, None], places[:, None, :]].transpose(0, 1)


def image_tokens(x: ME.SparseTensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each image's rows side by side as its tokens: (B, n, C) tokens, (N,) each row's slot in the
    flattened (B, n), (B, n) bool, which slots hold a row (``PatchSites.image_slots``)."""
    slots, present = PatchSites.of(x).image_slots(x.tensor_stride[0])
    return into_slots(x.F, slots, present), slots, present


def on_image_tokens(x: ME.SparseTensor, attend: Callable[[Tensor, Tensor], Tensor]) -> ME.SparseTensor:
    """``attend((B, n, C) tokens, (B, n) bool: which slots hold a row)`` on each image's rows side by
    side (``image_tokens``), its (B, n, C') output gathered back to the rows."""
    tokens, slots, present = image_tokens(x)
    return from_slots(x, attend(tokens, present), slots)


class SparseFactorAttention(FactorAttention):
    """CoaT's factorised attention of each image's visible rows side by side (``image_tokens``) and
    its class token."""

    def forward(self, x: ME.SparseTensor, cls: Tensor) -> tuple[ME.SparseTensor, Tensor]:
        tokens, slots, present = image_tokens(x)
        out, out_cls = self.attend(tokens, present, cls)
        return from_slots(x, out, slots), out_cls


def image_positions(x: ME.SparseTensor) -> tuple[tuple[Tensor, Tensor], tuple[int, int]]:
    """(B, n) each ``image_tokens`` slot's row and column in its image (0 in empty slots), and the
    whole images' (h, w) at the rows' stride."""
    sites, stride = PatchSites.of(x), x.tensor_stride[0]
    _, h, w = sites.canvas_shape(stride)
    side = max(h, w)
    position = sites.group_positions(stride, side)  # y * side + x
    return (position // side, position % side), (h, w)


def on_placed_image_tokens(x: ME.SparseTensor, check: Callable[[int, int], None],
                           attend: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]) -> ME.SparseTensor:
    """``on_image_tokens`` for ``attend(tokens, present, (B, n) each token's row, and column in its
    image)``; ``check(h, w)`` first refuses a map larger than the offsets reach."""
    (ys, xs), (h, w) = image_positions(x)
    check(h, w)
    return on_image_tokens(x, lambda tokens, present: attend(tokens, present, ys, xs))


class SparseRelativeLogitsAttention(RelativeLogitsAttention):
    """BotNet's attention on each image's visible rows side by side, their rows and columns from
    their positions in the image: queries at visible sites only."""

    def forward(self, x: ME.SparseTensor, height_rel: Tensor, width_rel: Tensor) -> ME.SparseTensor:
        return on_placed_image_tokens(x, self.check, lambda tokens, present, ys, xs: self.attend(
            tokens, present, ys, xs, height_rel, width_rel))


class SparseLambdaMixing(LambdaMixing):
    """The lambda layer's mixing on each image's visible rows side by side (``on_image_tokens``), the
    global variant's rows and columns from their positions in the image: at visible sites only."""

    def forward(self, x: ME.SparseTensor, pos_emb: Tensor | None = None) -> ME.SparseTensor:
        if self.feat is None:
            return on_image_tokens(x, self.mix)
        return on_placed_image_tokens(x, self.check, lambda tokens, present, ys, xs: self.mix(
            tokens, present, ys, xs, pos_emb))


class SparseCrossCovarianceAttention(CrossCovarianceAttention):
    """Each image's visible rows side by side as its tokens (the padding's zeros add nothing)."""

    def forward(self, x: ME.SparseTensor, temperature: Tensor) -> ME.SparseTensor:
        return on_image_tokens(x, lambda tokens, present: self.attend(tokens, temperature))


class SparseChannelGroupAttention(ChannelGroupAttention):
    """Each image's visible rows side by side as its tokens (the padding's zeros add nothing); an
    image's tokens are its visible rows."""

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        return on_image_tokens(x, lambda tokens, present: self.attend(tokens, present.sum(1)))


def at_sites(x: ME.SparseTensor, table: Callable[[int, int], Tensor]) -> Tensor:
    """(N, C): each row's entry of ``table(h, w)``, a (C, h, w) table over an image's map at the
    rows' stride."""
    sites, stride = PatchSites.of(x), x.tensor_stride[0]
    _, h, w = sites.canvas_shape(stride)
    return table(h, w).flatten(1).t().index_select(0, sites.canvas_index(stride) % (h * w))


class SparseFourierPositions(FourierPositions):
    """The encoding of the whole images' map at the rows' stride, each row given its site's."""

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        return with_features(x, x.F + at_sites(x, self.encoding))


class SparseSelfAttention(SelfAttention):
    """Each image's visible rows side by side as its tokens (``PatchSites.image_slots``: no padding
    when every image keeps as many patches), attended, gathered back: the arithmetic of the visible
    tokens alone, a sixth of dense attention's at mask 0.6."""

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        return on_image_tokens(x, self.attend)


class SparseGroupedQueryAttention(GroupedQueryAttention):
    """Each image's visible query rows attend to its visible key rows (at their own stride)."""

    def forward(self, q: ME.SparseTensor, k: ME.SparseTensor, v: ME.SparseTensor) -> ME.SparseTensor:
        same_sites(k, v, "attend with keys and values on")
        queries, slots, _ = image_tokens(q)
        keys, _, present = image_tokens(k)
        values, _, _ = image_tokens(v)
        return from_slots(q, self.attend(queries, keys, values, present), slots)


class SparsePoolingAttention(PoolingAttention):
    """MViTv2's attention: each image's visible query rows attend to its visible key rows (at
    their own stride), their rows and columns from their sites in the image."""

    def forward(self, q: ME.SparseTensor, k: ME.SparseTensor, v: ME.SparseTensor, rel_h: Tensor | None,
                rel_w: Tensor | None, cls: tuple[Tensor, Tensor, Tensor] | None = None):
        same_sites(k, v, "attend with keys and values on")
        (queries, slots, _), (keys, _, present) = image_tokens(q), image_tokens(k)
        (q_at, q_size), (k_at, k_size) = image_positions(q), image_positions(k)
        out = self.attend(queries, keys, image_tokens(v)[0], present, q_at, k_at, q_size, k_size, rel_h, rel_w, cls)
        return from_slots(q, out, slots) if cls is None else (from_slots(q, out[0], slots), out[1])


class SparseOffsetBiasAttention(OffsetBiasAttention):
    """EfficientFormerV2's attention: each image's visible query rows attend to its visible key rows,
    their rows and columns from their sites in the image."""

    def forward(self, q: ME.SparseTensor, k: ME.SparseTensor, v: ME.SparseTensor, biases: Tensor,
                heads_before: nn.Module | None = None, heads_after: nn.Module | None = None) -> ME.SparseTensor:
        same_sites(k, v, "attend with keys and values on")
        (queries, slots, _), (keys, _, present) = image_tokens(q), image_tokens(k)
        (q_at, _), (k_at, k_size) = image_positions(q), image_positions(k)
        self.check(*k_size)
        out = self.attend(queries, keys, image_tokens(v)[0], present, q_at, k_at, biases, heads_before, heads_after)
        return from_slots(q, out, slots)


class SparsePackedQkvAttention(PackedQkvAttention):
    """Each image's visible rows attend to its visible rows (CPUBone's heads, packed)."""

    def forward(self, qkv: ME.SparseTensor) -> ME.SparseTensor:
        tokens, slots, present = image_tokens(qkv)
        return from_slots(qkv, self.attend_packed(tokens, present), slots)


class SparseMaskUnitAttention(MaskUnitAttention, SparseGroupedQueryAttention):
    """Hiera's attention on the rows: within mask units that are the mask's patches, each visible
    patch's query rows attend to its key rows (rows are patch-major at every stride: one view, no
    gather); within other units (SAM 2's windows of several patches), the rows laid into their
    units' slots (``PatchSites.group_slots``, as many units as the whole images' map has: units
    wholly hidden attended for nothing, never read); over images, as ``SparseGroupedQueryAttention``."""

    def forward(self, q: ME.SparseTensor, k: ME.SparseTensor, v: ME.SparseTensor) -> ME.SparseTensor:
        if self.unit is None:
            return SparseGroupedQueryAttention.forward(self, q, k, v)
        same_sites(k, v, "attend with keys and values on")
        sites, stride = PatchSites.of(k), k.tensor_stride[0]
        self.check(*sites.canvas_shape(stride)[1:])
        side = sites.sites_per_side(stride)
        if side == self.unit:
            patches = k.F.shape[0] // side ** 2
            queries, keys, values = (t.F.view(patches, -1, t.F.shape[1]) for t in (q, k, v))
            present = keys.new_ones(keys.shape[:2], dtype=torch.bool)
            return with_features(q, self.attend(queries, keys, values, present).reshape(q.F.shape[0], -1))
        q_slots, q_present = sites.group_slots(q.tensor_stride[0], self.unit * stride // q.tensor_stride[0])
        k_slots, present = sites.group_slots(stride, self.unit)
        queries = into_slots(q.F, q_slots, q_present)
        keys, values = into_slots(k.F, k_slots, present), into_slots(v.F, k_slots, present)
        return from_slots(q, self.attend(queries, keys, values, present), q_slots)


class SparseAbsolutePositions(AbsolutePositions):
    """The table's row of each row's site in its image."""

    def forward(self, x: ME.SparseTensor, table: Tensor | Callable[[int, int], Tensor]) -> ME.SparseTensor:
        return with_features(x, x.F + at_sites(x, lambda h, w: self.checked(table, h, w)))


class SparseWindowAttention(WindowAttention):
    """Attention within groups of sites. Where unshifted groups tile each patch (MaxViT's and Swin
    V2's of 8x8 at stride 4, at 256 px), each visible patch's rows regrouped in place: nothing
    scattered, no hidden query. Where one unshifted group holds a whole image (TinyViT's at strides
    16 and 32, Twins-SVT's and Swin's at 32, at 224 px), each image's visible rows side by side as
    its tokens (``image_tokens``), the bias gathered at their positions in the group: queries at
    visible sites only. Other groups, which hold sites of several patches: the rows
    scattered straight into their groups' slots (``PatchSites.group_slots``, as many groups as the
    whole images' map has: hidden queries computed, never read), attended, gathered back."""

    def forward(self, x: ME.SparseTensor, bias: Tensor | None = None, **terms: Tensor | None) -> ME.SparseTensor:
        sites, stride = PatchSites.of(x), x.tensor_stride[0]
        _, h, w = sites.canvas_shape(stride)
        per_patch, rest = divmod(sites.sites_per_side(stride), self.window)
        if not self.shift and per_patch and not rest:
            return with_features(x, self.within_patches(x.F, per_patch, bias, **terms))
        if h <= self.window and w <= self.window and not self.shift:
            tokens, slots, present = image_tokens(x)
            if bias is not None:
                position = sites.group_positions(stride, self.window)
                bias = bias_at(bias, position)
        else:
            slots, present = sites.group_slots(stride, self.window, self.shift)
            tokens = into_slots(x.F, slots, present)
        return from_slots(x, self.attend_groups(tokens, present, bias, **terms), slots)

    def within_patches(self, rows: Tensor, per_patch: int, bias: Tensor | None, **terms: Tensor | None) -> Tensor:
        """(N, C) rows, patch-major and row by row in each patch -> (N, C'), attended within the
        per_patch x per_patch groups of ``window`` x ``window`` sites that tile each visible patch."""
        q, ws = per_patch, self.window
        groups = rows.view(-1, q, ws, q, ws, rows.shape[1]).transpose(2, 3).reshape(-1, ws * ws, rows.shape[1])
        out = self.attend_groups(groups, groups.new_ones(groups.shape[:2], dtype=torch.bool), bias, **terms)
        return out.view(-1, q, q, ws, ws, out.shape[-1]).transpose(2, 3).reshape(rows.shape[0], -1)


def on_canvas(x: ME.SparseTensor) -> tuple[Tensor, Tensor, Tensor]:
    """The whole images' (B, C, h, w) map at the rows' stride, zeros where hidden, (B, h, w) bool:
    which sites hold a row, and the rows' (N,) index into the flattened (B, h, w)."""
    sites, stride = PatchSites.of(x), x.tensor_stride[0]
    index, (b, h, w) = sites.canvas_index(stride), sites.canvas_shape(stride)
    present = torch.zeros(b * h * w, dtype=torch.bool, device=index.device).index_fill_(0, index, True)
    return to_canvas(x.F, index, (b, h, w)), present.view(b, h, w), index


def on_canvas_sites(x: ME.SparseTensor, attend: Callable[[Tensor, Tensor], Tensor]) -> ME.SparseTensor:
    """``attend((B, h, w, C) the whole images' map at the rows' stride, zeros where hidden, (B, h,
    w) bool: which sites hold a row)``, its (B, h, w, C') output gathered back to the rows."""
    canvas, present, index = on_canvas(x)
    out = attend(canvas.permute(0, 2, 3, 1), present)
    return with_features(x, out.reshape(-1, out.shape[-1]).index_select(0, index))


class SparseHaloAttention(HaloAttention):
    """Halo attention. Where a block is one patch or 2x2 of them (HaloNet's at strides 4 and 8): each
    visible patch's query rows attend to the window of its block, gathered from the whole images'
    zero-padded map of keys (visible queries only; a block's window once per visible patch in it).
    Larger blocks (the window would be gathered many times over) and blocks straddling patches: on
    the whole images' maps, every block attended as in timm, hidden queries computed and never read.
    The hidden keys are left out either way."""

    def forward(self, q: ME.SparseTensor, kv: ME.SparseTensor, height_rel: Tensor,
                width_rel: Tensor) -> ME.SparseTensor:
        span, patch = self.block * kv.tensor_stride[0], PatchSites.of(kv).patch_size  # in pixels
        if span % patch == 0 and span // patch <= 2:
            return with_features(q, self.attend_patches(q, kv, height_rel, width_rel))
        (q_map, _, index), (kv_map, keys, _) = on_canvas(q), on_canvas(kv)
        return with_features(q, from_canvas(self.attend(q_map, kv_map, keys, height_rel, width_rel), index))

    def attend_patches(self, q: ME.SparseTensor, kv: ME.SparseTensor, height_rel: Tensor,
                       width_rel: Tensor) -> Tensor:
        """(N, heads * value_dim) outputs of q's rows, each visible patch's against its block's window."""
        sites = PatchSites.of(kv)
        kv_map, keys, _ = on_canvas(kv)
        b, c, h, w = kv_map.shape
        self.check(h, w)
        heads, kd, vd, halo = self.num_heads, self.key_dim, self.value_dim, self.halo
        win, per_block = self.block + 2 * halo, self.block * kv.tensor_stride[0] // sites.patch_size
        # each visible patch's block: its window's sites on the padded map, flattened
        patch, (_, ph, pw) = sites.canvas_index(sites.patch_size), sites.canvas_shape(sites.patch_size)
        image, py, px = patch // (ph * pw), patch // pw % ph, patch % pw
        (wy, wx), padded = grid_sites(win, patch.device), (h + 2 * halo, w + 2 * halo)
        at = ((image[:, None] * padded[0] + py[:, None] // per_block * self.block + wy) * padded[1]
              + px[:, None] // per_block * self.block + wx).flatten()  # (V * win * win,)
        rows = F.pad(kv_map, [halo] * 4).permute(0, 2, 3, 1).reshape(-1, c).index_select(0, at)
        k, v = rows.view(-1, win * win, heads, kd + vd).transpose(1, 2).split([kd, vd], -1)
        counted = F.pad(keys.to(torch.uint8), [halo] * 4, value=1).flatten().index_select(0, at).bool()
        # each query's (row, column) in its block: its patch's place in the block and its own in the patch
        side = sites.sites_per_side(q.tensor_stride[0])
        qy, qx = grid_sites(side, patch.device)
        qy, qx = (py % per_block * side)[:, None] + qy, (px % per_block * side)[:, None] + qx  # (V, side * side)
        tables = ((at_k[None, None, :] - at_q[:, :, None] + win - 1)[:, None].expand(-1, heads, -1, -1)
                  for at_q, at_k in ((qy, wy), (qx, wx)))
        queries = q.F.view(-1, side * side, heads, kd).transpose(1, 2)  # (V, heads, side * side, kd)
        out = self.attend_windows(queries, k, v, counted.view(-1, 1, 1, win * win), *tables, height_rel, width_rel)
        return out.transpose(1, 2).reshape(-1, heads * vd)  # rows in q's order: patch-major


def grid_tokens(x: ME.SparseTensor,
                blocks: Callable[[int, int], tuple[int, int]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The rows in their groups of a grid (``PatchSites.grid_slots`` of the ``blocks(h, w)`` of the
    whole images' h x w map): (G, n, C) tokens, (N,) each row's slot in the flattened (G, n), (G, n)
    bool, which slots hold a row, (G, n) each slot's place in its group."""
    sites, stride = PatchSites.of(x), x.tensor_stride[0]
    slots, present, places = sites.grid_slots(stride, blocks(*sites.canvas_shape(stride)[1:]))
    return into_slots(x.F, slots, present), slots, present, places


class SparseGridAttention(GridAttention):
    """MobileViT's and MaxViT's groups span the whole image: each group's visible rows side by side
    (``grid_tokens``), the bias gathered at their places in the grid; queries at visible sites only."""

    def forward(self, x: ME.SparseTensor, bias: Tensor | None = None, **terms: Tensor | None) -> ME.SparseTensor:
        tokens, slots, present, places = grid_tokens(x, self.blocks)
        bias = None if bias is None else bias_at(bias, places)
        return from_slots(x, self.attend_groups(tokens, present, bias, **terms), slots)


class SparseSeparableGridAttention(SeparableGridAttention):
    """MobileViT v2's separable attention on each group's visible rows side by side (``grid_tokens``)."""

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        tokens, slots, present, _ = grid_tokens(x, self.blocks)
        return from_slots(x, self.attend_groups(tokens, present), slots)
