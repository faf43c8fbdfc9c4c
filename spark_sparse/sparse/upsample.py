"""Nearest or bilinear upsampling of a sparse map by a power of two (HRNet's fusion of a coarser
branch into a finer one; EfficientFormerV2's attention at stride 32 brought back to 16).

Nearest: at stride s a visible patch holds S x S sites (S = 32 / s), patch-major, row by row; the
finer map at stride s / f holds (S f) x (S f), and each of its sites takes the value of the coarser
site it lies in, which is in the same patch: the visible set of every stride is the same patches,
so nothing hidden is read and nothing is written outside them. A view and an expansion of the
rows, no index table; autograd sums each f x f block's gradients back into its source row.

Bilinear: a finer site also reads a neighbouring coarser site, across the patch's border where it
lies at the patch's edge: the rows go onto the whole images' zeroed map at the coarse stride (a
hidden site reads zero, as in dense masking; torch clamps at the image's border), torch upsamples
it, and the visible finer rows are gathered back.
"""

from __future__ import annotations

import MinkowskiEngine as ME
import torch.nn.functional as F
from torch import nn

from .patch_conv import from_canvas, to_canvas
from .patch_sites import PatchSites


class PatchUpsample(nn.Module):
    """``nn.Upsample(scale_factor=f, mode=mode)`` of the visible rows, f a power of two, ``mode``
    'nearest' or 'bilinear' (corners not aligned)."""

    mode: str = "nearest"  # (a class default too: modules pickled before it existed)

    def __init__(self, scale: int, mode: str = "nearest"):
        super().__init__()
        if mode not in ("nearest", "bilinear"):
            raise ValueError(f"upsampling mode must be 'nearest' or 'bilinear', got '{mode}'")
        self.scale, self.mode = scale, mode

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        sites = PatchSites.of(x)
        stride, f = x.tensor_stride[0], self.scale
        if stride % f:
            raise ValueError(f"cannot upsample a stride-{stride} map by {f}: past the pixels' own grid")
        if self.mode == "bilinear":
            canvas = to_canvas(x.F, sites.canvas_index(stride), sites.canvas_shape(stride))
            fine = F.interpolate(canvas, scale_factor=f, mode="bilinear", align_corners=False)
            rows = from_canvas(fine, sites.canvas_index(stride // f))
        else:
            s, c = sites.sites_per_side(stride), x.F.shape[1]
            rows = x.F.view(-1, s, 1, s, 1, c).expand(-1, s, f, s, f, c).reshape(-1, c)
        return ME.SparseTensor(rows, coordinate_map_key=sites.key(stride // f), coordinate_manager=sites.manager)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, mode={self.mode}"
