"""Nearest upsampling of a sparse map by a power of two (HRNet's fusion of a coarser branch into
a finer one).

At stride s a visible patch holds S x S sites (S = 32 / s), patch-major, row by row; the finer map
at stride s / f holds (S f) x (S f), and each of its sites takes the value of the coarser site it
lies in, which is in the same patch: the visible set of every stride is the same patches, so
nothing hidden is read and nothing is written outside them. A view and an expansion of the rows,
no index table; autograd sums each f x f block's gradients back into its source row.
"""

from __future__ import annotations

import MinkowskiEngine as ME
from torch import nn

from .patch_sites import PatchSites


class PatchUpsample(nn.Module):
    """``nn.Upsample(scale_factor=f, mode='nearest')`` of the visible rows, f a power of two."""

    def __init__(self, scale: int):
        super().__init__()
        self.scale = scale

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        sites = PatchSites.of(x)
        stride, f = x.tensor_stride[0], self.scale
        if stride % f:
            raise ValueError(f"cannot upsample a stride-{stride} map by {f}: past the pixels' own grid")
        s, c = sites.sites_per_side(stride), x.F.shape[1]
        rows = x.F.view(-1, s, 1, s, 1, c).expand(-1, s, f, s, f, c).reshape(-1, c)
        return ME.SparseTensor(rows, coordinate_map_key=sites.key(stride // f), coordinate_manager=sites.manager)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"
