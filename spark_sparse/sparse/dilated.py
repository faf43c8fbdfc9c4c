"""Dilated sparse convolution (SKNet's 3x3 with dilation 2, its "5x5" path) over mask-aligned
visible blocks.

A k x k kernel with dilation d is the ((k - 1) d + 1)-wide kernel that is zero between its taps:
where that window stays within a block's neighbours (d (k // 2) sites at most), the convolution
runs on ``GroupedConvolution``'s exact paths (tiles, offset or window GEMMs) with that kernel,
(d (k - 1) + 1)^2 / k^2 times the arithmetic of the taps (25 / 9 for SKNet's). Over smaller
blocks (one site a patch at stride 32, where the window reaches two patches away) it runs on the
whole images' zeroed map at this stride, with torch's own dilated convolution, and gathers the
visible sites back. Parameters keep timm's layout (``weight`` (C_out, C_in / groups, k, k)).
"""

from __future__ import annotations

import MinkowskiEngine as ME
from torch import Tensor

from .depthwise import canvas_convolution
from .grouped_conv import GroupedConvolution
from .patch_sites import PatchSites


def expand_dilated(weight: Tensor, dilation: int) -> Tensor:
    """(C_out, C_in / G, k, k) taps -> the ((k - 1) d + 1)-wide kernel holding them d apart."""
    c_out, c_in, k, _ = weight.shape
    size = (k - 1) * dilation + 1
    full = weight.new_zeros(c_out, c_in, size, size)
    full[:, :, ::dilation, ::dilation] = weight
    return full


class DilatedConvolution(GroupedConvolution):
    """A centred k x k (odd k) submanifold or strided convolution with dilation ``dilation``,
    grouped or not."""

    def __init__(self, *args, dilation: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        if self.padding is not None:
            raise ValueError("a dilated convolution runs centred only (padding None)")
        self.dilation = dilation

    def weight_kernel(self) -> Tensor:
        return expand_dilated(self.weight, self.dilation)

    def canvas_rows(self, x: ME.SparseTensor, sites: PatchSites) -> Tensor:
        # torch's own dilated convolution of the taps, not the wider kernel holding them
        return canvas_convolution(x.F, self.weight, sites, x.tensor_stride[0], self.stride, dilation=self.dilation,
                                  groups=self.groups)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dilation={self.dilation}"
