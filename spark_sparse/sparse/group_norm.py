"""Group norm with its activation over each image's visible rows (timm's GroupNormAct; BiT's 32 groups).

A dense group norm takes an image's statistics over its whole map, and over a masked map it would
count the hidden zeros. Here an image's mean and variance per group are taken over that image's
visible sites (and the group's channels) only: no statistic mixes images and none sees the
hidden area, so features are batch-independent and canvas-invariant in train mode too (a group
norm has no batch statistics nor running ones). Rows are patch-major (patch_sites.py) and every
patch has S x S of them, so a patch's sums are a reshape and a reduction; an image's are an
index_add over its patches. As ``BatchNormAct``, it keeps only its input (and the per-image
statistics) for backward and recomputes the normalised rows; the operator after it need not keep
them either (row_saving.py).
"""

from __future__ import annotations

import copy

import MinkowskiEngine as ME
import torch
from torch import Tensor, nn

from ..precision import statistics_dtype
from .amp import autocast_backward, autocast_forward
from .norm_act import activate_, activation_grad
from .patch_sites import PatchSites


def _per_channel(stat: Tensor, channels: int) -> Tensor:
    """(B, G) per-group statistics -> (B, C)."""
    return stat.repeat_interleave(channels // stat.shape[1], dim=1)


def _per_patch(per_image: Tensor, image: Tensor) -> Tensor:
    """(B, C) per-image values -> (P, 1, C), to broadcast over (P, rows, C) patches."""
    return per_image.index_select(0, image)[:, None]


def _patches_per_image(image: Tensor, batch: int, dtype: torch.dtype) -> Tensor:
    """(B, 1) how many patches each image has (at least 1): a scatter, where ``bincount`` would
    read its input's maximum on the host (a GPU wait) and has no meta kernel."""
    ones = torch.ones((), dtype=dtype, device=image.device).expand(image.shape[0])
    count = torch.zeros(batch, dtype=dtype, device=image.device).index_add_(0, image, ones)
    return count.clamp_min(1)[:, None]


def _group_statistics(x: Tensor, image: Tensor, batch: int, groups: int) -> tuple[Tensor, Tensor]:
    """Each image's mean and variance per group over its rows, (B, G) each. Per patch and channel
    first (a mean, then the squares around it: no E[x^2] - E[x]^2 cancellation), then combined:
    every (patch, channel) holds equally many values, so an image's group mean is the mean of
    theirs and its variance the mean of theirs plus the mean squared distance of theirs from it.
    (Plain reductions over the rows: torch's var_mean over them is many times slower on CPU.)"""
    p, c = image.shape[0], x.shape[1]
    xp = x.view(p, -1, c)
    mean_pc = xp.mean(1)  # (P, C)
    centred = xp - mean_pc[:, None]
    var_pc = (centred * centred).mean(1)
    patches = _patches_per_image(image, batch, x.dtype)
    width = c // groups
    mean = x.new_zeros(batch, groups).index_add_(0, image, mean_pc.view(p, groups, width).mean(2)) / patches
    spread = mean_pc - _per_channel(mean, c).index_select(0, image)
    var_pg = (var_pc + spread * spread).view(p, groups, width).mean(2)
    return mean, x.new_zeros(batch, groups).index_add_(0, image, var_pg) / patches


def _scale_shift(weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor,
                 channels: int) -> tuple[Tensor, Tensor]:
    """(B, C) scale and shift: the normalised rows are x * scale + shift."""
    scale = _per_channel(invstd, channels)
    if weight is not None:
        scale = scale * weight
    shift = -_per_channel(mean, channels) * scale
    return scale, shift if bias is None else shift + bias


def _normalised(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor,
                image: Tensor) -> Tensor:
    """The affine-normalised rows (one multiply-add per element); ``image``: each patch's image."""
    scale, shift = _scale_shift(weight, bias, mean, invstd, x.shape[1])
    xp = x.view(image.shape[0], -1, x.shape[1])
    return torch.addcmul(_per_patch(shift, image), xp, _per_patch(scale, image)).view_as(x)


def _output(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor, image: Tensor,
            act: nn.Module) -> Tensor:
    """The normalised, activated rows, computed in float32 and returned in the rows' dtype."""
    y = _normalised(x.to(statistics_dtype(x.dtype)), weight, bias, mean, invstd, image)
    return activate_(act, y).to(x.dtype)


class GroupNormAct(torch.autograd.Function):
    """Group norm over each image's rows (``image``: the image of each patch of rows), then an
    elementwise activation; keeps the input and the (B, G) statistics for backward."""

    @staticmethod
    @autocast_forward(cast_inputs=False)  # 16-bit rows kept as they come; statistics in float32
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, image: Tensor, batch: int,
                groups: int, eps: float, act: nn.Module) -> Tensor:
        mean, var = _group_statistics(x.to(statistics_dtype(x.dtype)), image, batch, groups)
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, bias, mean, invstd, image)
        ctx.act = act
        return _output(x, weight, bias, mean, invstd, image, act)

    @staticmethod
    @autocast_backward
    def backward(ctx, grad: Tensor):
        x, weight, bias, mean, invstd, image = ctx.saved_tensors
        x = x.to(statistics_dtype(x.dtype))  # the gradients' sums in float32: autograd casts them back
        grad = grad.to(x.dtype)
        (batch, groups), (p, c) = mean.shape, (image.shape[0], x.shape[1])
        y = _normalised(x, weight, bias, mean, invstd, image)
        grad_y = activation_grad(ctx.act, y, grad).view(p, -1, c)
        xp, rows = x.view(p, -1, c), grad_y.shape[1]
        mean_c, invstd_c = _per_channel(mean, c), _per_channel(invstd, c)
        # per patch and channel: the sums of grad_y and of grad_y * xhat, xhat = (x - mean) * invstd
        sum_g = grad_y.sum(1)  # (P, C)
        sum_gxhat = ((grad_y * xp).sum(1) - mean_c.index_select(0, image) * sum_g) * invstd_c.index_select(0, image)
        w = x.new_ones(c) if weight is None else weight
        count = _patches_per_image(image, batch, x.dtype) * (rows * (c // groups))

        def image_group_mean(per_patch: Tensor) -> Tensor:
            """The (B, C) per-image, per-group mean of a per-patch, per-channel sum times w."""
            sums = (per_patch * w).view(p, groups, -1).sum(2)
            return _per_channel(mean.new_zeros(batch, groups).index_add_(0, image, sums) / count, c)

        need = ctx.needs_input_grad
        grad_x = None
        if need[0]:
            # invstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = grad_y * w, is per
            # image and channel grad_y * g_scale + x * x_scale + shift: two multiply-adds a row
            m1, m2 = image_group_mean(sum_g), image_group_mean(sum_gxhat)
            g_scale, x_scale = invstd_c * w, -invstd_c * invstd_c * m2
            shift = invstd_c * (mean_c * invstd_c * m2 - m1)
            grad_x = torch.addcmul(_per_patch(shift, image), grad_y, _per_patch(g_scale, image))
            grad_x = grad_x.addcmul_(xp, _per_patch(x_scale, image)).view_as(x)
        grad_w = sum_gxhat.sum(0) if need[1] and weight is not None else None
        grad_b = sum_g.sum(0) if need[2] and bias is not None else None
        return grad_x, grad_w, grad_b, None, None, None, None, None

    @staticmethod
    def output_again(node) -> Tensor:
        """What the forward of ``node``, one of this function's backward nodes, returned."""
        return _output(*node.saved_tensors, node.act)


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
        out = GroupNormAct.apply(x.F, self.weight, self.bias, sites.image_of_patches(), sites.batch,
                                 self.num_groups, self.eps, self.act)
        return ME.SparseTensor(out, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"
