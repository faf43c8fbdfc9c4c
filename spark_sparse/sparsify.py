"""Step 2: visible pixels become a MinkowskiEngine sparse tensor, and back.

Coordinates are (batch, row, col) in input pixels; a feature map of tensor stride s keeps its
sites at multiples of s, as MinkowskiEngine does.
"""

from __future__ import annotations

import MinkowskiEngine as ME
import torch
from torch import Tensor

from .mask import upsample_active


def sparsify(images: Tensor, active: Tensor) -> ME.SparseTensor:
    """Images (B, C, H, W) and a visible-patch grid -> one SparseTensor of the visible pixels."""
    visible = upsample_active(active, images.shape[-2:])[:, 0]
    coords = visible.nonzero().int().contiguous()
    feats = images.permute(0, 2, 3, 1)[visible]
    # ME's autograd functions are float32/float64 only
    if feats.dtype not in (torch.float32, torch.float64):
        feats = feats.float()
    return ME.SparseTensor(feats, coordinates=coords, device=images.device)


def to_dense(x: ME.SparseTensor, batch: int, size: tuple[int, int]) -> Tensor:
    """A SparseTensor -> (B, C, h, w) with zeros at absent sites, ``size`` = (h, w) at its stride."""
    stride = x.tensor_stride
    coords = x.C.long()
    b, r, c = coords[:, 0], coords[:, 1] // stride[0], coords[:, 2] // stride[1]
    out = x.F.new_zeros(batch, size[0], size[1], x.F.shape[1])
    out = out.index_put((b, r, c), x.F)
    return out.permute(0, 3, 1, 2)
