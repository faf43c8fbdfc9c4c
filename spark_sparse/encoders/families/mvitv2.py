"""The MViTv2 family (timm ``mvitv2``: Multiscale Vision Transformer v2, ``mvitv2_tiny`` .. ``_large``).

A 7x7 stride-4 convolution (padding 3) is the stem; four stages of transformer blocks follow at
strides 4, 8, 16, 32, each x + attention(norm1(x)), then x + MLP(norm2(x)). The attention pools:
after its qkv projection, each head's q, k and v are convolved by a depthwise 3x3 shared by the
heads (``pool_q``, ``pool_k``, ``pool_v``, padding 1) and layer-normed over the head's channels.
q's convolution strides 2 where a stage starts (the block's shortcut, projected or not, is then
max-pooled 3x3 / 2); k's and v's stride 4, 2, 1, 1 by stage, so the keys lie at stride 16 (32 in
the last stage; a stage's first block reads the previous stride), whole cells of the mask's
32-pixel patches. Each visible query attends to its image's visible keys, the logits plus the
query's products with learned embeddings of the key's row and column offset from it (decomposed
relative positions, ``rel_pos_h``, ``rel_pos_w``), and adds its q (residual pooling).

timm's position tables are indexed from the far corner of the map its input size makes, so an
offset's entry depends on the map's size: MViTv2 runs at its own input size alone, as timm does,
and an image inside a larger canvas is another input (batch independence, not canvas
invariance). The ``_cls`` models carry a class token beside the map (``class_token.py``): it is
one more query, key and value of each image's attention (timm pools the map's q, k and v alone, then
norms the token's with them), without relative positions, and its block's shortcut is not pooled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.mvitv2 import MultiScaleAttention, MultiScaleBlock, MultiScaleVit, MultiScaleVitStage, PatchEmbed
from torch import Tensor, nn

from ..attention import map_tokens
from ..class_token import DropPathBoth, check_mlp_rows, layer_norm_rows, linear_rows, mlp_rows
from .convnext import MirrorMlp
from ..family import Family, own_input_size
from ..layouts import Layout, check_strides
from ..leaves import ChannelSplit
from ..mirrors import Converter, MirrorChildren, MirrorInOrder
from ..refusals import CheckpointingRefused, ConversionError, unsupported
from .hrnet import mirror_module_list


class HeadSharedConv2d(nn.Module):
    """MViTv2's pooling: timm's depthwise k x k convolution of one head's ``d`` channels (odd k,
    centred, no bias) run on every head's channels of a map with the same kernel, (B, heads * d,
    H, W) -> (B, heads * d, H / s, W / s); ``weight`` (d, 1, k, k) is timm's."""

    def __init__(self, conv: nn.Conv2d, heads: int, path: str):
        super().__init__()
        k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        square = conv.kernel_size == (k, k) and conv.stride == (s, s) and tuple(conv.padding) == (p, p)
        if not (square and k % 2 == 1 and p == k // 2 and conv.bias is None and conv.dilation == (1, 1)
                and conv.groups == conv.in_channels == conv.out_channels and s & (s - 1) == 0):
            raise unsupported(conv, path, "only a centred odd square depthwise kernel without bias, at a stride "
                                          "that is a power of two, pools")
        self.heads, self.stride = heads, s
        self.weight = nn.Parameter(conv.weight.detach().clone())

    @property
    def kernel_size(self) -> int:
        return self.weight.shape[-1]

    def kernel(self) -> Tensor:
        """The (heads * d, 1, k, k) depthwise kernel the heads run with."""
        return self.weight.repeat(self.heads, 1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.kernel(), None, self.stride, self.kernel_size // 2, groups=x.shape[1])

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, channels={self.weight.shape[0]}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}")


class HeadLayerNorm(nn.Module):
    """timm's layer norm over one head's channels (MViTv2's ``norm_q``, ``norm_k``, ``norm_v``) at
    every site of each head: ``weight`` and ``bias`` (d,) are timm's."""

    def __init__(self, norm: nn.LayerNorm, heads: int):
        super().__init__()
        self.heads, self.eps = heads, norm.eps
        self.weight = nn.Parameter(norm.weight.detach().clone())
        self.bias = nn.Parameter(norm.bias.detach().clone())

    def rows(self, x: Tensor) -> Tensor:
        """(..., heads * d) -> the same, each head's d channels normed."""
        heads = x.unflatten(-1, (self.heads, -1))
        return F.layer_norm(heads, self.weight.shape, self.weight, self.bias, self.eps).flatten(-2)

    def forward(self, x: Tensor) -> Tensor:
        return self.rows(x.movedim(1, -1)).movedim(-1, 1)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, channels={self.weight.shape[0]}, eps={self.eps}"


def offsets(q_at: Tensor, k_at: Tensor, q_side: int, k_side: int) -> Tensor:
    """(B, n) queries' and (B, m) keys' rows (or columns) on maps of ``q_side`` and ``k_side``
    sites -> (B, n, m) int64: timm's index of each key's offset from each query in its table
    (both measured on the finer map, counted from the coarser map's far corner)."""
    q_ratio, k_ratio = max(k_side / q_side, 1.0), max(q_side / k_side, 1.0)
    return (q_at[:, :, None] * q_ratio - k_at[:, None, :] * k_ratio + (k_side - 1) * k_ratio).long()


class PoolingAttention(nn.Module):
    """MViTv2's attention after its pooling: per head, softmax((q d^-1/2) k^T + q . rel_h[row offset]
    + q . rel_w[column offset]) v, plus q where ``residual``; each visible query attends to its
    image's visible keys. The tables (timm's ``rel_pos_h``, ``rel_pos_w``: (L, d)) come with the
    features; ``relative`` False: none. A parameter-free leaf every engine converts to its own twin."""

    def __init__(self, num_heads: int, head_dim: int, residual: bool, relative: bool):
        super().__init__()
        self.num_heads, self.head_dim, self.residual, self.relative = num_heads, head_dim, residual, relative

    def like(self, cls: type) -> "PoolingAttention":
        return cls(self.num_heads, self.head_dim, self.residual, self.relative)

    @staticmethod
    def check(entries: int, q_side: int, k_side: int) -> None:
        """Refuse, in one line, maps whose offsets reach past a table of ``entries`` (from the maps'
        sizes alone: nothing is read back from the device)."""
        q_ratio, k_ratio = max(k_side / q_side, 1.0), max(q_side / k_side, 1.0)
        if (q_side - 1) * q_ratio + (k_side - 1) * k_ratio >= entries:
            raise ValueError(f"MViTv2's relative position tables reach {entries} offsets, too few for queries on "
                             f"{q_side} and keys on {k_side} sites a side; use the model's own input size")

    def attend(self, q: Tensor, k: Tensor, v: Tensor, keys: Tensor, q_at: tuple[Tensor, Tensor],
               k_at: tuple[Tensor, Tensor], q_size: tuple[int, int], k_size: tuple[int, int],
               rel_h: Tensor | None, rel_w: Tensor | None, cls: tuple[Tensor, Tensor, Tensor] | None = None):
        """(B, n, C) queries, (B, m, C) keys and values, (B, m) bool: which keys count, each query's
        and key's (row, column), the maps' (h, w) at their strides -> (B, n, C); with ``cls``, the
        class token's (B or 1, C) query, key and value first among them (no relative position), and
        its (B, C) output too."""
        b, n, _ = q.shape
        if cls is not None:
            q, k, v = (torch.cat([c.to(t.dtype).expand(b, -1)[:, None], t], 1) for c, t in zip(cls, (q, k, v)))
            keys = torch.cat([keys.new_ones(b, 1), keys], 1)
        first = 0 if cls is None else 1  # the map's first token
        q, k, v = (t.view(b, -1, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        logits = (q * self.head_dim ** -0.5) @ k.transpose(-1, -2)
        if self.relative:  # each query's products with every offset's embedding, read at each key's offset
            for table, axis in ((rel_h, 0), (rel_w, 1)):
                self.check(table.shape[0], q_size[axis], k_size[axis])
                index = offsets(q_at[axis], k_at[axis], q_size[axis], k_size[axis])[:, None]
                rel = (q[:, :, first:] @ table.to(q.dtype).t()).gather(-1, index.expand(-1, self.num_heads, -1, -1))
                logits = logits + F.pad(rel, [first, 0, first, 0])  # the class token's row and column: none
        keys = keys | ~keys.any(1, keepdim=True)  # an image without a key: outputs never read
        out = logits.masked_fill(~keys[:, None, None, :], float("-inf")).softmax(-1) @ v
        if self.residual:
            out = out + q
        out = out.transpose(1, 2).reshape(b, n + first, -1)
        return out if cls is None else (out[:, 1:], out[:, 0])

    def forward(self, q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor | None, rel_w: Tensor | None,
                cls: tuple[Tensor, Tensor, Tensor] | None = None):
        b, _, h, w = q.shape
        (queries, qy, qx), (keys, ky, kx) = map_tokens(q), map_tokens(k)
        present = keys.new_ones(keys.shape[:2], dtype=torch.bool)
        out = self.attend(queries, keys, map_tokens(v)[0], present, (qy, qx), (ky, kx), (h, w), tuple(k.shape[-2:]),
                          rel_h, rel_w, cls)
        if cls is None:
            return out.transpose(1, 2).reshape(b, -1, h, w)
        return out[0].transpose(1, 2).reshape(b, -1, h, w), out[1]

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, residual={self.residual}, "
                f"relative={self.relative}")


class MirrorAttention(nn.Module):
    """qkv split into q, k and v, each pooled and normed per head, attended (``PoolingAttention``),
    projected; the relative position tables under timm's names."""

    def __init__(self, module: MultiScaleAttention, convert: Converter, path: str):
        super().__init__()
        if module.mode != "conv":
            raise unsupported(module, path, f"mode '{module.mode}': only shared convolutional pooling (mode 'conv')")
        heads, d = module.num_heads, module.head_dim
        self.qkv = convert(module.qkv, f"{path}.qkv")
        # parameter-free, names timm's lacks
        self.split_q = convert.leaf(ChannelSplit(module.dim_out), f"{path}.split_q")
        self.split_k = convert.leaf(ChannelSplit(module.dim_out), f"{path}.split_k")
        for name in ("q", "k", "v"):
            pool, norm = getattr(module, f"pool_{name}"), getattr(module, f"norm_{name}")
            setattr(self, f"pool_{name}", None if pool is None else
                    convert.leaf(HeadSharedConv2d(pool, heads, f"{path}.pool_{name}"), f"{path}.pool_{name}"))
            setattr(self, f"norm_{name}", None if norm is None else
                    convert.leaf(HeadLayerNorm(norm, heads), f"{path}.norm_{name}"))
        relative = module.rel_pos_type == "spatial"
        if relative:
            self.rel_pos_h = nn.Parameter(module.rel_pos_h.detach().clone())
            self.rel_pos_w = nn.Parameter(module.rel_pos_w.detach().clone())
        else:
            self.rel_pos_h = self.rel_pos_w = None
        self.attention = convert.leaf(PoolingAttention(heads, d, module.residual_pooling, relative),
                                      f"{path}.attention")
        self.proj = convert(module.proj, f"{path}.proj")

    def pooled(self, x, name: str):
        pool, norm = getattr(self, f"pool_{name}"), getattr(self, f"norm_{name}")
        x = x if pool is None else pool(x)
        return x if norm is None else norm(x)

    def normed_rows(self, rows: Tensor, name: str) -> Tensor:
        """The class token's q, k or v: normed as the map's (after their pooling, which it skips)."""
        norm = getattr(self, f"norm_{name}")
        return rows if norm is None else norm.rows(rows)

    def forward(self, x, cls: Tensor | None = None):
        q, kv = self.split_q(self.qkv(x))
        k, v = self.split_k(kv)
        q, k, v = self.pooled(q, "q"), self.pooled(k, "k"), self.pooled(v, "v")
        if cls is None:
            return self.proj(self.attention(q, k, v, self.rel_pos_h, self.rel_pos_w))
        tokens = tuple(self.normed_rows(t, name) for t, name in zip(linear_rows(self.qkv, cls).chunk(3, -1), "qkv"))
        out, out_cls = self.attention(q, k, v, self.rel_pos_h, self.rel_pos_w, tokens)
        return self.proj(out), linear_rows(self.proj, out_cls)


class MirrorBlock(MirrorChildren):
    """x (or its normed projection) [max-pooled where the stage starts] + attn(norm1(x)), then x (or
    its normed projection) + MLP(norm2(x)), each branch with its drop path."""

    children_names = ("norm1", "shortcut_proj_attn", "shortcut_pool_attn", "attn", "drop_path1", "norm2",
                      "shortcut_proj_mlp", "mlp", "drop_path2")

    def forward(self, x):
        x_norm = self.norm1(x)
        shortcut = x if self.shortcut_proj_attn is None else self.shortcut_proj_attn(x_norm)
        if self.shortcut_pool_attn is not None:
            shortcut = self.shortcut_pool_attn(shortcut)
        x = shortcut + self.drop_path1(self.attn(x_norm))
        x_norm = self.norm2(x)
        shortcut = x if self.shortcut_proj_mlp is None else self.shortcut_proj_mlp(x_norm)
        return shortcut + self.drop_path2(self.mlp(x_norm))


class MirrorTokenBlock(MirrorBlock):
    """A ``_cls`` model's block: the same for the map and its class token alike (its shortcut not
    pooled), each branch's drop path one draw per image for both."""

    def __init__(self, module: MultiScaleBlock, convert: Converter, path: str):
        super().__init__(module, convert, path)
        check_mlp_rows(module.mlp, f"{path}.mlp")
        self.drop_path1 = DropPathBoth(module.drop_path1, convert, f"{path}.drop_path1")
        self.drop_path2 = DropPathBoth(module.drop_path2, convert, f"{path}.drop_path2")

    @staticmethod
    def shortcut(x, cls: Tensor, x_norm, cls_norm: Tensor, proj: nn.Module | None):
        return (x, cls) if proj is None else (proj(x_norm), linear_rows(proj, cls_norm))

    def forward(self, x, cls: Tensor):
        x_norm, cls_norm = self.norm1(x), layer_norm_rows(self.norm1, cls)
        shortcut, cls_shortcut = self.shortcut(x, cls, x_norm, cls_norm, self.shortcut_proj_attn)
        if self.shortcut_pool_attn is not None:
            shortcut = self.shortcut_pool_attn(shortcut)
        x, cls = self.drop_path1(shortcut, cls_shortcut, *self.attn(x_norm, cls_norm))
        x_norm, cls_norm = self.norm2(x), layer_norm_rows(self.norm2, cls)
        shortcut, cls_shortcut = self.shortcut(x, cls, x_norm, cls_norm, self.shortcut_proj_mlp)
        return self.drop_path2(shortcut, cls_shortcut, self.mlp(x_norm), mlp_rows(self.mlp, cls_norm))


def mirror_block(module: MultiScaleBlock, convert: Converter, path: str) -> MirrorBlock:
    """A block's mirror: with the class token beside the map where its attention has one."""
    return (MirrorTokenBlock if module.attn.has_cls_token else MirrorBlock)(module, convert, path)


class MirrorStage(nn.Module):
    """The blocks, in order (timm's pass the map's size along), with the class token where there is one."""

    def __init__(self, stage: MultiScaleVitStage, convert: Converter, path: str):
        super().__init__()
        self.blocks = convert(nn.Sequential(*stage.blocks), f"{path}.blocks")

    def forward(self, x, cls: Tensor | None = None):
        if cls is None:
            return self.blocks(x)
        for block in self.blocks:
            x, cls = block(x, cls)
        return x, cls


class MirrorPatchEmbed(MirrorInOrder):
    """The 7x7 stride-4 convolution (timm flattens its map to tokens)."""

    children_names = ("proj",)


def mvitv2_layout(model: MultiScaleVit) -> Layout:
    """Stem, stages and the final norm; a stage's stride from its first block's shortcut pooling."""
    reduction, reductions = model.patch_embed.proj.stride[0], []
    for stage in model.stages:
        pool = stage.blocks[0].shortcut_pool_attn
        reduction *= 1 if pool is None else (pool.stride if isinstance(pool.stride, int) else pool.stride[0])
        reductions.append(reduction)
    check_strides(model, reductions)
    stages = tuple((f"stages.{i}",) for i in range(len(model.stages) - 1)) + ((f"stages.{len(model.stages) - 1}",
                                                                               "norm"),)
    return Layout(("patch_embed",), stages, tuple(stage.blocks[-1].dim_out for stage in model.stages))


def mvitv2_features(net: nn.Module, x) -> list:
    """The four stages' maps, the last through ``norm``: timm's ``forward_intermediates(norm=True)``
    on a timm model; on the converted body the same flow, with the class token where there is one."""
    if isinstance(net, MultiScaleVit):
        return net.forward_intermediates(x, norm=True, intermediates_only=True)
    x = net.patch_embed(x)
    cls = net.cls_token[0] if hasattr(net, "cls_token") else None  # (1, C): the first block makes it each image's
    feats = []
    for stage in net.stages:
        if cls is None:
            x = stage(x)
        else:
            x, cls = stage(x, cls)
        feats.append(x)
    feats[-1] = net.norm(x)
    return feats


def check(model: MultiScaleVit) -> None:
    """No absolute position embedding; no gradient checkpointing."""
    CheckpointingRefused("stages")(model)
    if model.pos_embed is not None:
        raise ConversionError("MViTv2 with an absolute position embedding (use_abs_pos) is not mirrored")


MVITV2 = Family(
    name="mvitv2",
    timm_class=MultiScaleVit,
    mirrors={PatchEmbed: MirrorPatchEmbed, MultiScaleVitStage: MirrorStage, MultiScaleBlock: mirror_block,
             MultiScaleAttention: MirrorAttention, Mlp: MirrorMlp, nn.ModuleList: mirror_module_list},
    layout=mvitv2_layout,
    check=check,
    features=mvitv2_features,
    input_sizes=own_input_size("indexes its relative positions from the corner of its own input size's map"),
    parameters=("cls_token",),
)
