"""Step 2: visible pixels become a MinkowskiEngine sparse tensor, and back.

Coordinates are (batch, row, col) in input pixels; a feature map of tensor stride s keeps its
sites at multiples of s, as MinkowskiEngine does. Rows are ordered patch by patch (see
patch_sites.py), which lets every layer work on whole visible patches without re-sorting.
"""

from __future__ import annotations

import MinkowskiEngine as ME
import torch
from torch import Tensor

from .patch_sites import STRING_ID, BatchCoordinates, PatchSites


def sparsify(images: Tensor, active: Tensor) -> ME.SparseTensor:
    """Images (B, C, H, W) and a visible-patch grid -> one SparseTensor of the visible pixels."""
    b, c, h, w = images.shape
    gh, gw = active.shape[-2:]
    patch = h // gh
    visible = active.reshape(-1).nonzero()[:, 0]  # flat (image, patch row, patch column) order
    patches = torch.stack([visible // (gh * gw), visible // gw % gh, visible % gw], 1)
    # (B * gh * gw, C, patch * patch) -> the visible patches' pixels, patch-major
    tiles = images.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c, -1)
    feats = tiles.index_select(0, visible).transpose(1, 2).reshape(-1, c)
    # ME's autograd functions are float32/float64 only. Under autocast the rows stay float32 too,
    # as the masked images of the dense engine do: the stem's convolution casts them.
    if feats.dtype not in (torch.float32, torch.float64):
        feats = feats.float()
    kind = ME.CoordinateMapType.CUDA if images.is_cuda else ME.CoordinateMapType.CPU
    network = BatchCoordinates(kind)  # strides 2..32: the layers' maps
    sites = PatchSites(network, patches, patch, (gh, gw), b)
    # The pixels' own map (by far the largest) lives in a manager of its own, which holds the
    # network's: it goes with the input tensor, right after the stem has read it, instead of
    # staying for the whole backward pass.
    pixels = BatchCoordinates(kind, network=network)
    sites.attach(network)
    sites.attach(pixels)
    # the coordinates are unique by construction: insert them directly, without ME's quantisation
    key, _ = pixels.insert_and_map(sites.coordinates(1), [1, 1], STRING_ID)
    sites.keys[1] = key
    return ME.SparseTensor(feats, coordinate_map_key=key, coordinate_manager=pixels)


def to_dense(x: ME.SparseTensor, batch: int, size: tuple[int, int]) -> Tensor:
    """A SparseTensor -> (B, C, h, w) with zeros at absent sites, ``size`` = (h, w) at its stride."""
    stride = x.tensor_stride
    coords = x.C.long()
    b, r, c = coords[:, 0], coords[:, 1] // stride[0], coords[:, 2] // stride[1]
    out = x.F.new_zeros(batch, size[0], size[1], x.F.shape[1])
    out = out.index_put((b, r, c), x.F)
    return out.permute(0, 3, 1, 2)
