"""Transposed convolution of a sparse map (LowFormer's learned upsampling of its attention's output).

A transposed convolution is the adjoint of the convolution with the same kernel, stride and
padding: where that one gathers each coarse site's window of fine sites, this one scatters each
coarse row, times the kernel's tap, into the fine sites of its window. So it needs no table of its
own: ``PatchSites.windows`` of the fine map, read the other way. A window reaches into the
neighbouring patches; a hidden or absent fine site (row N) takes nothing, and a hidden coarse
site has no row to give, as the masked map's zeros give nothing. With ``kernel - 2 * padding ==
stride`` the fine map is the coarse one's sites times the stride, so every patch keeps its sites.
"""

from __future__ import annotations

import math

import MinkowskiEngine as ME
import torch
from torch import nn

from ..precision import statistics_dtype
from .patch_sites import PatchSites


class TransposedConvolution(nn.Module):
    """``nn.ConvTranspose2d`` of the visible rows, one group or depthwise; parameters keep torch's
    layout (``weight`` (C_in, C_out / groups, k, k), ``bias``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int,
                 groups: int = 1, bias: bool = True):
        super().__init__()
        if kernel_size - 2 * padding != stride:
            raise ValueError(f"a transposed {kernel_size}x{kernel_size} convolution at stride {stride} with "
                             f"padding {padding} does not make stride x stride sites of each one")
        if groups not in (1, in_channels) or (groups > 1 and in_channels != out_channels):
            raise ValueError(f"a transposed convolution of {groups} groups ({in_channels} -> {out_channels} "
                             "channels): only one group or depthwise")
        self.kernel_size, self.stride, self.padding, self.groups = kernel_size, stride, padding, groups
        self.weight = nn.Parameter(torch.empty(in_channels, out_channels // groups, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        sites = PatchSites.of(x)
        coarse = x.tensor_stride[0]
        if coarse % self.stride:
            raise ValueError(f"cannot upsample a stride-{coarse} map by {self.stride}: past the pixels' own grid")
        fine = coarse // self.stride
        # (N_coarse, K) fine rows, taps with the first axis fastest; N_fine where absent
        windows = sites.windows(fine, self.kernel_size, self.stride, self.padding)
        n, c_out = sites.num_rows(fine), self.weight.shape[1] * self.groups
        # each coarse row's contribution to its window's taps, in the windows' order (kx * k + ky)
        if self.groups == 1:
            cols = x.F @ self.weight.permute(0, 3, 2, 1).reshape(self.weight.shape[0], -1)
        else:
            cols = x.F.unsqueeze(1) * self.weight[:, 0].permute(2, 1, 0).reshape(-1, c_out)
        cols = cols.reshape(-1, c_out)
        # summed in float32 for 16-bit rows, as a GEMM sums its products
        cols = cols.to(statistics_dtype(cols.dtype))
        out = cols.new_zeros(n + 1, cols.shape[1]).index_add_(0, windows.view(-1), cols)[:n]
        if self.bias is not None:
            out = out + self.bias
        return ME.SparseTensor(out.to(x.F.dtype), coordinate_map_key=sites.key(fine),
                               coordinate_manager=sites.manager)

    def extra_repr(self) -> str:
        c_in, c_out = self.weight.shape[0], self.weight.shape[1] * self.groups
        return (f"{c_in}, {c_out}, kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"groups={self.groups}, bias={self.bias is not None}")
