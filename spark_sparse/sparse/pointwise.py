"""Grouped and depthwise 1x1 convolutions, strided or not, over mask-aligned visible blocks
(RepVGG's grouped 1x1 branch, MobileOne's depthwise 1x1 "scale" branch).

A 1x1 convolution has no neighbours: a strided one reads, for each site of the coarser grid,
the site of the finer grid at the same coordinates (the top-left one of its window), which the
patch-major rows give by slicing each block (no index table); then each group's channels go
through their own matrix (per channel: a scale, for a depthwise one). A tile or an offset table
would cost more, and tiles for a window smaller than its stride would not even cover the block.
"""

from __future__ import annotations

import MinkowskiEngine as ME
import torch
from torch import Tensor, nn

from .patch_sites import PatchSites


def strided_rows(feats: Tensor, sites_per_side: int, stride: int) -> Tensor:
    """The rows of the sites at multiples of ``stride`` in each block, patch-major, as the
    coarser grid orders them."""
    s, c = sites_per_side, feats.shape[1]
    return feats.view(-1, s, s, c)[:, ::stride, ::stride].reshape(-1, c)


class GroupedPointwise(nn.Module):
    """A 1x1 convolution with ``groups`` > 1 (depthwise where every group is one channel in and
    out) and any stride, with timm's parameters (``weight`` (C_out, C_in / G, 1, 1), ``bias``)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, stride: int = 1, bias: bool = False):
        super().__init__()
        self.stride, self.groups = stride, groups
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels // groups, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        sites = PatchSites.of(x)
        in_stride, out_stride = x.tensor_stride[0], x.tensor_stride[0] * self.stride
        feats = x.F if self.stride == 1 else strided_rows(x.F, sites.sites_per_side(in_stride), self.stride)
        c_out, c_in_g = self.weight.shape[:2]
        g = self.groups
        if c_in_g == 1 and c_out == g:  # depthwise: a scale per channel
            out = feats * self.weight.view(1, c_out)
        else:  # (G, n, C_in/G) @ (G, C_in/G, C_out/G)
            weight = self.weight.view(g, c_out // g, c_in_g).transpose(1, 2)
            out = torch.bmm(feats.view(-1, g, c_in_g).transpose(0, 1), weight).transpose(0, 1).reshape(-1, c_out)
        if self.bias is not None:
            out = out + self.bias
        if self.stride == 1:
            return ME.SparseTensor(out, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)
        return ME.SparseTensor(out, coordinate_map_key=sites.key(out_stride), coordinate_manager=sites.manager)

    def extra_repr(self) -> str:
        c_out, c_in_g = self.weight.shape[:2]
        return f"{c_in_g * self.groups}, {c_out}, kernel_size=1, stride={self.stride}, groups={self.groups}"
