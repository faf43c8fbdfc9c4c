"""Step 2: visible pixels become a MinkowskiEngine sparse tensor, and back.

Coordinates are (batch, row, col) in input pixels; a feature map of tensor stride s keeps its
sites at multiples of s, as MinkowskiEngine does. Rows are ordered patch by patch (see
patch_sites.py), which lets every layer work on whole visible patches without re-sorting.

The features live on the images' device; the mask is read on the CPU, where MinkowskiEngine's
(CPU) coordinate manager and the batch's index tables are made: a CUDA build of MinkowskiEngine
is not needed, and nothing here waits for the GPU when the mask is on the CPU.
"""

from __future__ import annotations

from typing import NamedTuple

import MinkowskiEngine as ME
import torch
from torch import Tensor

from ..transfer import is_on
from .patch_sites import BatchCoordinates, PatchSites


class SparseLayout(NamedTuple):
    """Where a batch's visible pixels go, made from its mask alone (``plan_layout``): the coordinate
    managers and the sites with their index tables (the visible patches' among them). Made ahead,
    while the GPU still runs the previous batch, it leaves a batch's forward pass nothing to build."""

    pixels: BatchCoordinates  # the pixels' map; it holds the layers' manager, which holds ``sites``
    sites: PatchSites


def plan_layout(active: Tensor, patch: int, device: torch.device | str, insert: bool = False,
                like: PatchSites | None = None) -> SparseLayout:
    """The layout of a batch masked by ``active`` (B, 1, gh, gw) with ``patch``-pixel patches,
    its features on ``device``. ``insert``: as for ``sparsify``. ``like``: the sites of an
    earlier batch of the same model, whose tables are built now for this one (a layer then
    finds its table made).

    ``active`` is best on the CPU: one on the GPU is copied back, which waits for the GPU."""
    device = torch.device(device)
    b, (gh, gw) = active.shape[0], active.shape[-2:]
    visible = active.detach().to("cpu").reshape(-1).nonzero()[:, 0]  # flat (image, patch row, patch column) order
    patches = torch.stack([visible // (gh * gw), visible // gw % gh, visible % gw], 1)
    kind = ME.CoordinateMapType.CUDA if insert and device.type == "cuda" else ME.CoordinateMapType.CPU
    network = BatchCoordinates(kind)  # strides 2..32: the layers' maps
    sites = PatchSites(network, patches, patch, (gh, gw), b, device, insert)
    # The pixels' own map (by far the largest) lives in a manager of its own, which holds the
    # network's: it goes with the input tensor, right after the stem has read it, instead of
    # staying for the whole backward pass.
    pixels = BatchCoordinates(kind, network=network)
    sites.attach(network)
    sites.attach(pixels)
    sites.key(1, pixels)
    if like is not None:
        sites.build_like(like)
    sites.patch_index()  # made with the rest when planned like an earlier batch, else now
    return SparseLayout(pixels, sites)


def copy_layout_(layout: SparseLayout, other: SparseLayout) -> None:
    """Overwrite ``layout``'s device tensors, in place, with those of ``other`` (planned ``like``
    it, as many visible patches per image): a step captured on ``layout`` replays ``other``'s."""
    layout.sites.copy_tables_(other.sites)


def sparsify(images: Tensor, active: Tensor, insert: bool = False,
             layout: SparseLayout | None = None) -> ME.SparseTensor:
    """Images (B, C, H, W) and a visible-patch grid -> one SparseTensor of the visible pixels.

    ``active`` is best on the CPU: one on the GPU is copied back, which waits for the GPU.
    ``insert``: register every coordinate map with MinkowskiEngine as soon as it is named, as
    its own modules (conv='minkowski'), which read maps in C++, need; otherwise a map is
    registered only when its coordinates are read (``x.C``): our operators never read them.
    With ``insert`` and CUDA images the maps are on the GPU, which needs a CUDA build.
    ``layout``: ``plan_layout``'s for this mask and device, made ahead (by default made now)."""
    b, c, h, w = images.shape
    gh, gw = active.shape[-2:]
    patch = h // gh
    if layout is None:
        layout = plan_layout(active, patch, images.device, insert)
    elif ((layout.sites.batch, layout.sites.grid, layout.sites.patch_size) != (b, (gh, gw), patch)
          or not is_on(images.device, layout.sites.device)):
        raise ValueError(f"the layout was planned for {layout.sites.batch} images of {layout.sites.grid} patches of "
                         f"{layout.sites.patch_size} pixels on {layout.sites.device}, not {b} of {(gh, gw)} of {patch} "
                         f"on {images.device}")
    # (B * gh * gw, C, patch * patch) -> the visible patches' pixels, patch-major
    tiles = images.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c, -1)
    feats = tiles.index_select(0, layout.sites.patch_index()).transpose(1, 2).reshape(-1, c)
    # ME's autograd functions are float32/float64 only. Under autocast the rows stay float32 too,
    # as the masked images of the dense engine do: the stem's convolution casts them.
    if feats.dtype not in (torch.float32, torch.float64):
        feats = feats.float()
    pixels = layout.pixels
    return ME.SparseTensor(feats, coordinate_map_key=layout.sites.key(1, pixels), coordinate_manager=pixels)


def to_dense(x: ME.SparseTensor, batch: int, size: tuple[int, int]) -> Tensor:
    """A SparseTensor -> (B, C, h, w) with zeros at absent sites, ``size`` = (h, w) at its stride."""
    stride = x.tensor_stride[0]
    manager = x.coordinate_manager
    sites = manager.sites if isinstance(manager, BatchCoordinates) else None
    h, w = size
    if sites is not None and sites.holds_rows_of(x):  # our rows: their places from the batch's tables, on the features' device
        index = sites.canvas_index(stride)
    else:  # a map MinkowskiEngine's own modules made (conv='minkowski'): its coordinates say where
        coords = x.C.long().to(x.F.device)
        index = (coords[:, 0] * h + coords[:, 1] // stride) * w + coords[:, 2] // stride
    out = x.F.new_zeros(batch * h * w, x.F.shape[1]).index_copy(0, index, x.F)
    return out.view(batch, h, w, -1).permute(0, 3, 1, 2)
