"""Blur pooling (timm's ``BlurPool2d``: anti-aliased downsampling) of a sparse map.

A fixed binomial 3x3 filter per channel at stride 2, as a strided depthwise convolution over
each visible patch's tile: its windows reach one site into the patches above and to the left,
where a hidden neighbour reads zero (the dense-masked map holds zeros there). timm pads by
reflection (``pad_mode='reflect'``; 'blurpc' models pad with zeros): at an image's first row and
column the window reads the image's own second row and column, which the reflected tile table
puts there (patch_sites.py). The filter is fixed: backward gives the rows' gradient only.
"""

from __future__ import annotations

import MinkowskiEngine as ME
from torch import Tensor, nn

from .patch_conv import TileConv
from .patch_sites import PatchSites, tile_geometry

PAD_MODES = ("reflect", "constant")


class PatchBlurPool(nn.Module):
    """timm's ``BlurPool2d`` (its ``filt``, ``stride`` 2, centred padding and ``pad_mode``) over the
    visible rows of a sparse map; the output holds the visible sites of the coarser grid."""

    def __init__(self, filt: Tensor, stride: int, padding: list[int], pad_mode: str):
        super().__init__()
        k = filt.shape[-1]
        if (k, stride, tuple(padding)) != (3, 2, (1, 1, 1, 1)) or pad_mode not in PAD_MODES:
            raise ValueError(f"a blur pool is mirrored with a 3x3 filter at stride 2, padded by 1 with "
                             f"{' or '.join(PAD_MODES)}; got {k}x{k}, stride {stride}, padding {padding}, {pad_mode}")
        self.register_buffer("filt", filt[:1].detach().clone(), persistent=False)  # one channel's: all equal
        self.stride, self.pad_mode = stride, pad_mode

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        sites = PatchSites.of(x)
        stride, channels = x.tensor_stride[0], x.F.shape[1]
        start, size = tile_geometry(sites.sites_per_side(stride), 3, self.stride)
        table = sites.reflected_tile if self.pad_mode == "reflect" else sites.tile
        weight = self.filt.expand(channels, 1, 3, 3).contiguous()
        out = TileConv.apply(x.F, weight, table(stride, start, size), self.stride, channels)
        return ME.SparseTensor(out, coordinate_map_key=sites.key(stride * self.stride),
                               coordinate_manager=sites.manager)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad_mode={self.pad_mode}"
