"""Space to depth of a sparse map (TResNet's stem: each 4x4 block of pixels becomes one site of
48 channels at stride 4; Swin's patch merging: each 2x2 block of sites, its column first).

A block of b x b sites at stride s is one site at stride s b, inside the same patch (b divides the
patch's sites per side), so nothing hidden is read: a patch's rows, S x S row by row, are viewed as
(S/b, b, S/b, b) and reordered, the block's row, its column and the channel making timm's channel
order. A view and a copy of the rows, no index table.
"""

from __future__ import annotations

import MinkowskiEngine as ME
from torch import nn

from .patch_sites import PatchSites


class PatchSpaceToDepth(nn.Module):
    """timm's ``SpaceToDepth(block_size)`` of the visible rows; ``columns_first``: the block's
    column before its row in the channels (Swin's patch merging)."""

    def __init__(self, block_size: int, columns_first: bool = False):
        super().__init__()
        self.block_size, self.columns_first = block_size, columns_first

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        sites = PatchSites.of(x)
        stride, b = x.tensor_stride[0], self.block_size
        s, c = sites.sites_per_side(stride), x.F.shape[1]
        if s % b:
            raise ValueError(f"cannot move {b}x{b} blocks of a stride-{stride} map into channels: a patch has "
                             f"{s}x{s} sites")
        order = (0, 1, 3, 4, 2, 5) if self.columns_first else (0, 1, 3, 2, 4, 5)
        rows = x.F.view(-1, s // b, b, s // b, b, c).permute(order).reshape(-1, b * b * c)
        return ME.SparseTensor(rows, coordinate_map_key=sites.key(stride * b), coordinate_manager=sites.manager)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, columns_first={self.columns_first}"
