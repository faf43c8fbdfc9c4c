"""Adaptive average pooling onto the mask's patch grid (PVT v2's linear attention pools its map to
7x7 for the keys, which at 224 px is one cell per 32-pixel patch).

Each visible patch's rows (S x S sites at their stride, patch-major) are averaged into one row at
stride 32, the patch's own: a hidden patch has no row, as its cell pools the masked map's zeros
(the attention reads no key from it). On any other grid of patches a cell would straddle patches,
reading part of a hidden one: refused in one line (``mask.check_patch_grid``).
"""

from __future__ import annotations

import MinkowskiEngine as ME
from torch import nn

from ..mask import check_patch_grid
from .patch_sites import PatchSites


class PatchGridPool(nn.Module):
    """``nn.AdaptiveAvgPool2d(size)`` of a map whose image is ``size`` x ``size`` patches."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        sites = PatchSites.of(x)
        check_patch_grid(self.size, sites.grid)
        s, c = sites.sites_per_side(x.tensor_stride[0]), x.F.shape[1]
        rows = x.F.view(-1, s * s, c).mean(1)
        return ME.SparseTensor(rows, coordinate_map_key=sites.key(sites.patch_size),
                               coordinate_manager=sites.manager)

    def extra_repr(self) -> str:
        return f"size={self.size}"
