"""EvoNorm-S0 (and S0a) and the filter response norm with each image's statistics over its visible
rows only (timm's EvoNorm2dS0, EvoNorm2dS0a, FilterResponseNormTlu2d: ResNetV2, RegNetZ, VoVNet and
EfficientNet variants).

EvoNorm-S0 divides ``x * sigmoid(v x)`` by the standard deviation of each image's group of
channels; the filter response norm divides each image's channel by its root mean square, then
takes the maximum with a learned threshold. Over a masked map those statistics would count the
hidden zeros: here they are taken over the visible sites, as group_norm.py's, so features are
batch-independent and canvas-invariant. Plain torch (autograd keeps what it needs); the
statistics are in float32 for 16-bit rows, as timm's.
"""

from __future__ import annotations

import MinkowskiEngine as ME
import torch
from timm.layers import EvoNorm2dS0, EvoNorm2dS0a, FilterResponseNormTlu2d
from torch import nn

from ..precision import statistics_dtype
from ..timm_models import copy_parameters
from .group_norm import _group_statistics
from .patch_sites import PatchSites


class SparseEvoNorm(nn.Module):
    """timm's EvoNorm2dS0 / S0a (``weight``, ``bias``, ``v``): ``x * sigmoid(v x)`` over each image's
    group standard deviation over its visible rows, then the affine. Without ``v`` S0 is only the
    affine and S0a divides ``x`` by that deviation."""

    def __init__(self, norm: EvoNorm2dS0):
        super().__init__()
        self.groups, self.eps = norm.groups, norm.eps
        self.divide_always = isinstance(norm, EvoNorm2dS0a)
        copy_parameters(norm, self, optional=("v",))

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        out = x.F
        if self.v is not None or self.divide_always:
            sites = PatchSites.of(x)
            stride, c = x.tensor_stride[0], x.F.shape[1]
            dtype = statistics_dtype(x.F.dtype)
            count = sites.mean_divisors(stride).to(dtype)[:, None] * (c // self.groups)
            patches = sites.image_of_patches()
            _, var, _ = _group_statistics(x.F.to(dtype).view(patches.shape[0], -1, c), patches, count, self.groups)
            std = (var + self.eps).sqrt().to(x.F.dtype).repeat_interleave(c // self.groups, 1)  # (B, C)
            if self.v is not None:
                out = out * torch.sigmoid(out * self.v.to(out.dtype))
            out = out / std.index_select(0, sites.image_of_rows(stride))
        out = out * self.weight.to(out.dtype) + self.bias.to(out.dtype)
        return ME.SparseTensor(out, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, groups={self.groups}, eps={self.eps}, s0a={self.divide_always}"


class SparseFilterResponseNorm(nn.Module):
    """timm's FilterResponseNormTlu2d (``weight``, ``bias``, ``tau``): each image's channel over its
    root mean square over its visible rows, the affine, then the maximum with ``tau``."""

    def __init__(self, norm: FilterResponseNormTlu2d):
        super().__init__()
        self.eps = norm.eps
        copy_parameters(norm, self, optional=("tau",))

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        sites = PatchSites.of(x)
        stride, dtype = x.tensor_stride[0], statistics_dtype(x.F.dtype)
        image = sites.image_of_rows(stride)
        squares = x.F.new_zeros(sites.batch, x.F.shape[1], dtype=dtype).index_add_(0, image, x.F.to(dtype).square())
        inv_rms = torch.rsqrt(squares / sites.mean_divisors(stride).to(dtype)[:, None] + self.eps).to(x.F.dtype)
        out = x.F * inv_rms.index_select(0, image) * self.weight.to(x.F.dtype) + self.bias.to(x.F.dtype)
        if self.tau is not None:
            out = torch.maximum(out, self.tau.to(out.dtype))
        return ME.SparseTensor(out, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
