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

from .norm_act import _ACT_KERNELS, _act_grad
from .patch_sites import PatchSites


def _per_row(stat: Tensor, image: Tensor) -> Tensor:
    """(B, G) per-image statistics -> (P, 1, G, 1), to broadcast over (P, rows, G, C/G) patches."""
    return stat.index_select(0, image)[:, None, :, None]


def _normalised(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor,
                image: Tensor) -> Tensor:
    """The affine-normalised rows, (P, rows, G, C/G); ``image``: each patch's image."""
    p, g = image.shape[0], mean.shape[1]
    xg = x.view(p, -1, g, x.shape[1] // g)
    y = (xg - _per_row(mean, image)) * _per_row(invstd, image)
    if weight is not None:
        y = y * weight.view(g, -1)
    return y if bias is None else y + bias.view(g, -1)


def _activated(y: Tensor, act: nn.Module) -> Tensor:
    kernels = _ACT_KERNELS.get(type(act))
    return kernels[0](y) if kernels is not None else act(y)


class GroupNormAct(torch.autograd.Function):
    """Group norm over each image's rows (``image``: the image of each patch of rows), then an
    elementwise activation; keeps the input and the (B, G) statistics for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, image: Tensor, batch: int,
                groups: int, eps: float, act: nn.Module) -> Tensor:
        p = image.shape[0]
        xg = x.view(p, -1, groups, x.shape[1] // groups)
        # each patch's mean and variance per group, then each image's: its patches have equally
        # many rows, so the image's mean is the mean of theirs and its variance the mean of theirs
        # plus the variance of their means (no E[x^2] - E[x]^2 cancellation)
        var_p, mean_p = torch.var_mean(xg, dim=(1, 3), correction=0)  # (P, G)
        patches = torch.bincount(image, minlength=batch).clamp_min(1).to(x.dtype)[:, None]
        mean = x.new_zeros(batch, groups).index_add_(0, image, mean_p) / patches
        spread = mean_p - mean.index_select(0, image)
        var = x.new_zeros(batch, groups).index_add_(0, image, var_p + spread * spread) / patches
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, bias, mean, invstd, image)
        ctx.act = act
        return _activated(_normalised(x, weight, bias, mean, invstd, image).view_as(x), act)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, bias, mean, invstd, image = ctx.saved_tensors
        p, g = image.shape[0], mean.shape[1]
        n, c = x.shape
        rows, width = n // p, c // g
        xhat = _normalised(x, None, None, mean, invstd, image)
        y = xhat if weight is None and bias is None else _normalised(x, weight, bias, mean, invstd, image)
        grad_y = _act_grad(ctx.act, y.view(n, c), grad).view(p, rows, g, width)
        w = torch.ones_like(mean[0, :, None]) if weight is None else weight.view(g, width)
        per_patch = grad_y.sum(1)  # (P, G, C/G)
        per_patch_xhat = (grad_y * xhat).sum(1)
        # d(loss)/d(xhat) = grad_y * w; its mean and its mean against xhat per image and group
        count = torch.bincount(image, minlength=mean.shape[0]).clamp_min(1).to(x.dtype)[:, None] * (rows * width)
        mean_dxhat = mean.new_zeros(mean.shape).index_add_(0, image, (per_patch * w).sum(-1)) / count
        mean_dxhat_xhat = mean.new_zeros(mean.shape).index_add_(0, image, (per_patch_xhat * w).sum(-1)) / count
        need = ctx.needs_input_grad
        grad_x = None
        if need[0]:
            grad_x = (grad_y * w - _per_row(mean_dxhat, image) - xhat * _per_row(mean_dxhat_xhat, image))
            grad_x = (grad_x * _per_row(invstd, image)).view(n, c)
        grad_w = per_patch_xhat.sum(0).view(c) if need[1] and weight is not None else None
        grad_b = per_patch.sum(0).view(c) if need[2] and bias is not None else None
        return grad_x, grad_w, grad_b, None, None, None, None, None

    @staticmethod
    def output_again(node) -> Tensor:
        """What the forward of ``node``, one of this function's backward nodes, returned."""
        x, weight, bias, mean, invstd, image = node.saved_tensors
        return _activated(_normalised(x, weight, bias, mean, invstd, image).view_as(x), node.act)


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
        out = GroupNormAct.apply(x.F, self.weight, self.bias, sites.patches[:, 0], sites.batch,
                                 self.num_groups, self.eps, self.act)
        return ME.SparseTensor(out, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"
