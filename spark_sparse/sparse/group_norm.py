"""Group norm with its activation over each image's visible rows (timm's GroupNormAct; BiT's 32 groups).

A dense group norm takes an image's statistics over its whole map, and over a masked map it would
count the hidden zeros. Here an image's mean and variance per group are taken over that image's
visible sites (and the group's channels) only: no statistic mixes images and none sees the
hidden area, so features are batch-independent and canvas-invariant in train mode too (a group
norm has no batch statistics nor running ones). Rows are patch-major (patch_sites.py) and every
patch has S x S of them, so a patch's sums are a reshape and a reduction; an image's are an
index_add over its patches. As ``BatchNormAct``, it keeps only its input (and the per-patch
statistics) for backward and recomputes the normalised rows; the operator after it need not keep
them either (row_saving.py), and the rows it makes again serve the norm's own backward too.
"""

from __future__ import annotations

import copy

import MinkowskiEngine as ME
import torch
from torch import Tensor, nn

from ..precision import statistics_dtype
from .amp import autocast_backward, autocast_forward
from .norm_act import activate_, activate_keeping, activation_grad
from .patch_sites import PatchSites


def _image_group_sums(per_patch: Tensor, image: Tensor, batch: int, groups: int) -> Tensor:
    """(P, C) per-patch sums -> (B, G) sums over each image's patches and each group's channels."""
    sums = per_patch.view(per_patch.shape[0], groups, -1).sum(2)
    return sums.new_zeros(batch, groups).index_add_(0, image, sums)


def _per_channel(per_group: Tensor, channels: int) -> Tensor:
    """(P, G) -> (P, 1, C): each group's value for its channels, to broadcast over a patch's rows
    (a small copy: row-sized operations then run over whole rows, which CPUs vectorise)."""
    p, g = per_group.shape
    return per_group[:, :, None].expand(p, g, channels // g).reshape(p, 1, channels)


def _group_statistics(xp: Tensor, image: Tensor, count: Tensor, groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each image's mean per group over its rows for each of its patches, (P, G), its variance,
    (B, G), and the rows less their mean; ``xp``: the rows as (P, rows, C), ``count``: (B, 1)
    values per image and group.
    Two passes (the mean, then the squares around it: no E[x^2] - E[x]^2 cancellation); each
    sums a patch's rows first, a reduction over one dimension (torch's var_mean over the rows is
    many times slower on CPU), then the (P, C) sums per image and group."""
    batch, c = count.shape[0], xp.shape[2]
    mean_p = (_image_group_sums(xp.sum(1), image, batch, groups) / count).index_select(0, image)
    centred = xp - _per_channel(mean_p, c)
    var = _image_group_sums((centred * centred).sum(1), image, batch, groups) / count
    return mean_p, var, centred


def _scale(invstd_p: Tensor, weight: Tensor | None, channels: int) -> Tensor:
    """(P, 1, C): what the centred rows are multiplied by."""
    if weight is None:
        return _per_channel(invstd_p, channels)
    p, g = invstd_p.shape
    return (invstd_p[:, :, None] * weight.view(g, -1)).view(p, 1, channels)


def _normalised(centred: Tensor, invstd_p: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """The normalised rows (P, rows, C) of the centred ones, before the activation."""
    scale = _scale(invstd_p, weight, centred.shape[2])
    return centred * scale if bias is None else torch.addcmul(bias, centred, scale)


class GroupNormAct(torch.autograd.Function):
    """Group norm over each image's rows (``image``: the image of each patch of rows; ``rows``:
    (B,) how many rows each image has, at least 1), then an elementwise activation; keeps the
    input and per-patch statistics for backward. Few whole-tensor operations (a GPU launches
    each one): per-patch statistics broadcast over each patch's (rows, C) block."""

    @staticmethod
    @autocast_forward(cast_inputs=False)  # 16-bit rows kept as they come; statistics in float32
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, image: Tensor, rows: Tensor,
                groups: int, eps: float, act: nn.Module) -> Tensor:
        dtype, (p, c) = statistics_dtype(x.dtype), (image.shape[0], x.shape[1])
        count = rows.to(dtype)[:, None] * (c // groups)
        mean_p, var, centred = _group_statistics(x.to(dtype).view(p, -1, c), image, count, groups)
        invstd_p = torch.rsqrt(var + eps).index_select(0, image)
        ctx.save_for_backward(x, weight, bias, mean_p, invstd_p, image, count)
        ctx.act, ctx.remade = act, None
        return activate_(act, _normalised(centred, invstd_p, weight, bias)).view_as(x).to(x.dtype)

    @staticmethod
    @autocast_backward
    def backward(ctx, grad: Tensor):
        x, weight, bias, mean_p, invstd_p, image, count = ctx.saved_tensors
        x = x.to(statistics_dtype(x.dtype))  # the gradients' sums in float32: autograd casts them back
        (p, g), c = mean_p.shape, x.shape[1]
        xp, mean_c, scale = x.view(p, -1, c), _per_channel(mean_p, c), _scale(invstd_p, weight, c)
        y = ctx.remade  # made by the consumer's backward, which ran just before (output_again)
        ctx.remade = None
        if y is None:  # the normalised rows again: one multiply-add a row
            shift = -mean_c * scale if bias is None else torch.addcmul(bias, mean_c, scale, value=-1)
            y = torch.addcmul(shift, xp, scale)
        grad_y = activation_grad(ctx.act, y, grad.to(x.dtype).reshape(y.shape))
        # per patch and channel: the sums of grad_y and of grad_y * xhat, xhat = (x - mean) * invstd
        sum_g = grad_y.sum(1)  # (P, C)
        sum_gxhat = torch.addcmul((grad_y * xp).sum(1), mean_c[:, 0], sum_g, value=-1) * _per_channel(invstd_p, c)[:, 0]
        need = ctx.needs_input_grad
        grad_x = None
        if need[0]:
            # invstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = grad_y * w, the
            # means per image and group (one index_add for both), is per patch and channel
            # grad_y * scale + x * x_scale + shift: two multiply-adds a row
            per_patch = torch.cat([sum_g, sum_gxhat], 1)
            if weight is not None:
                per_patch = per_patch * weight.repeat(2)
            means = (_image_group_sums(per_patch, image, count.shape[0], 2 * g) / count).index_select(0, image)
            m1, m2 = means.chunk(2, 1)  # (P, G) each
            x_scale = (invstd_p * invstd_p * m2).neg_()
            shift = torch.addcmul((invstd_p * m1).neg_(), x_scale, mean_p, value=-1)
            grad_x = torch.addcmul(_per_channel(shift, c), grad_y, scale)
            grad_x = grad_x.addcmul_(xp, _per_channel(x_scale, c)).view_as(x)
        grad_w = sum_gxhat.sum(0) if need[1] and weight is not None else None
        grad_b = sum_g.sum(0) if need[2] and bias is not None else None
        return grad_x, grad_w, grad_b, None, None, None, None, None

    @staticmethod
    def output_again(node) -> Tensor:
        """What the forward of ``node``, one of this function's backward nodes, returned; the
        rows before the activation stay on the node for its own backward, which runs next."""
        x, weight, bias, mean_p, invstd_p = node.saved_tensors[:5]
        p, c = mean_p.shape[0], x.shape[1]
        centred = x.to(statistics_dtype(x.dtype)).view(p, -1, c) - _per_channel(mean_p, c)
        out, node.remade = activate_keeping(node.act, _normalised(centred, invstd_p, weight, bias))
        return out.view_as(x).to(x.dtype)


class SparseGroupNormAct(nn.Module):
    """timm's GroupNormAct (its ``weight`` and ``bias``) with each image's statistics over its
    visible sites, then its activation."""

    def __init__(self, norm: nn.GroupNorm, act: nn.Module):
        super().__init__()
        self.num_groups, self.num_channels, self.eps = norm.num_groups, norm.num_channels, norm.eps
        self.weight = None if norm.weight is None else nn.Parameter(norm.weight.detach().clone())
        self.bias = None if norm.bias is None else nn.Parameter(norm.bias.detach().clone())
        self.act = copy.deepcopy(act)
        if hasattr(self.act, "inplace"):
            self.act.inplace = False  # its input is recomputed, and a leaf, in backward

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        sites = PatchSites.of(x)
        out = GroupNormAct.apply(x.F, self.weight, self.bias, sites.image_of_patches(),
                                 sites.mean_divisors(x.tensor_stride[0]), self.num_groups, self.eps, self.act)
        return ME.SparseTensor(out, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"
