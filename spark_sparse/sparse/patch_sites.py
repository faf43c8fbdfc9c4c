"""Where the visible sites of one batch are, at every stride: coordinates, ME keys, index tables.

A SparK mask keeps whole 32x32-pixel patches, so at stride s the visible sites form whole
S x S blocks (S = 32 / s). Rows of every feature matrix are kept patch-major (patch, row in
patch, column in patch); ``PatchSites`` (one per batch, held by the batch's ``BatchCoordinates``
and shared by all layers) registers those coordinates with MinkowskiEngine once per stride and
builds, once per batch, the tables the operators of patch_conv.py index with. A table is a
tensor of row numbers where N (one past the last row) stands for an absent site.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import MinkowskiEngine as ME
import torch
from torch import Tensor

STRING_ID = "patch"  # our coordinate maps, never confused with ones ME builds itself

# Blocks of at least this many sites per side run k x k convolutions on tiles; smaller ones (the
# deeper stages, where a tile would be mostly halo) as offset GEMMs or on a per-image canvas.
# Measured by benchmarks/conv_paths.py: tiles win at 8x8 blocks, are within 10% at 4x4.
TILE_MIN_SITES = 8


class Tile(NamedTuple):
    """Each patch's ``size`` x ``size`` neighbourhood, starting ``start`` sites before its corner."""

    rows: Tensor  # (P * size * size,) int32: the row at each tile position, N where absent
    start: int
    size: int
    sites: int  # sites per side of the patch itself
    present_rows: Tensor  # ``rows`` with row 0 for absent sites (overwritten after gathering) ...
    absent: Tensor  # ... at these positions
    halo_positions: Tensor  # positions outside the patch itself that hold a present row ...
    halo_rows: Tensor  # ... and those rows: where a tile's gradient spills into other patches


class OffsetPairs(NamedTuple):
    """The present (output row, input row) pairs of one kernel offset; None means every row
    (all outputs have this neighbour / the input row is the output row itself)."""

    offset: int
    out: Tensor | None
    inp: Tensor | None


class BatchCoordinates(ME.CoordinateManager):
    """MinkowskiEngine's coordinate manager for one batch, holding that batch's ``PatchSites``
    (where every patch operator finds its tables) and, for the manager of the pixels' own map,
    the manager of the layers' maps (``network``), which must live at least as long."""

    def __init__(self, coordinate_map_type: ME.CoordinateMapType,
                 network: "BatchCoordinates | None" = None) -> None:
        super().__init__(D=2, coordinate_map_type=coordinate_map_type)
        self.network = network
        self.sites: PatchSites | None = None


def centred_padding(kernel_size: int) -> int:
    """The zero padding above and left of the map that centres an odd kernel's window (none for
    an even kernel, which never overlaps at its own stride)."""
    return kernel_size // 2 if kernel_size % 2 else 0


def tile_geometry(sites_per_side: int, kernel_size: int, stride: int, padding: int | None = None) -> tuple[int, int]:
    """(start, size) of the input tile whose valid convolution gives the patch's outputs.

    ``padding`` is the convolution's zero padding above and left of the map: output site i reads
    input sites from ``stride * i - padding``. None: a centred odd kernel (or none for an even
    one). TensorFlow's "same" padding at stride 2 pads ``(k - 2) // 2`` there, one site less
    than a centred kernel's, on maps with even sides (every map a mask on the 32-pixel grid
    reaches a stride-2 layer with): its window starts one site later."""
    start = -(centred_padding(kernel_size) if padding is None else padding)
    size = (sites_per_side // stride - 1) * stride + kernel_size
    return start, size


class PatchSites:
    """Coordinates, ME keys and index tables of one batch's visible patches, at every stride."""

    def __init__(self, manager: BatchCoordinates, patches: Tensor, patch_size: int,
                 grid: tuple[int, int], batch: int):
        # the manager of the layers' maps (strides > 1; sparsify keeps the pixels' map apart);
        # it holds the sites (``attach``): a weak link back, so that no reference cycle keeps a
        # batch's coordinate maps alive until the garbage collector happens to run
        self._manager = weakref.ref(manager)
        self.patches = patches  # (P, 3): batch, patch row, patch column; the row order of everything
        self.device = patches.device  # of every table: the features' device
        self.patch_size = patch_size
        self.grid = grid
        self.batch = batch
        self.keys: dict[int, ME.CoordinateMapKey] = {}
        self._cache: dict[tuple, object] = {}

    @staticmethod
    def of(x: ME.SparseTensor) -> "PatchSites":
        manager = x.coordinate_manager
        sites = manager.sites if isinstance(manager, BatchCoordinates) else None
        if sites is None:
            raise ValueError("patch convolutions need a SparseTensor made by spark_sparse.sparse.sparsify "
                             "(mask-aligned patches); use conv='minkowski' for arbitrary sparse tensors")
        return sites

    @property
    def manager(self) -> BatchCoordinates:
        return self._manager()

    def attach(self, manager: BatchCoordinates) -> None:
        """Make ``PatchSites.of`` find these sites from tensors of ``manager``."""
        manager.sites = self

    def sites_per_side(self, stride: int) -> int:
        return self.patch_size // stride

    def num_rows(self, stride: int) -> int:
        return self.patches.shape[0] * self.sites_per_side(stride) ** 2

    def coordinates(self, stride: int) -> Tensor:
        """(N, 3) int32 coordinates (batch, row, column in input pixels) at ``stride``, patch-major."""
        s, p = self.sites_per_side(stride), self.patches.int()
        steps = torch.arange(s, dtype=torch.int32, device=self.device) * stride
        rows = (p[:, 1:2] * self.patch_size + steps).view(-1, s, 1).expand(-1, s, s)
        cols = (p[:, 2:3] * self.patch_size + steps).view(-1, 1, s).expand(-1, s, s)
        return torch.stack([p[:, 0].view(-1, 1, 1).expand(-1, s, s), rows, cols], -1).view(-1, 3)

    def key(self, stride: int) -> ME.CoordinateMapKey:
        if stride not in self.keys:
            key, _ = self.manager.insert_and_map(self.coordinates(stride), [stride, stride], STRING_ID)
            self.keys[stride] = key
        return self.keys[stride]

    def _cached(self, key: tuple, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def image_of_rows(self, stride: int) -> Tensor:
        """(N,) int64: the image each row at ``stride`` belongs to (rows of an image are contiguous)."""
        def build():
            return self.patches[:, 0].repeat_interleave(self.sites_per_side(stride) ** 2)
        return self._cached(("image_of_rows", stride), build)

    def rows_per_image(self, stride: int) -> Tensor:
        """(B,) int64: how many rows each image has at ``stride`` (0 for a wholly hidden image)."""
        def build():
            per_patch = torch.bincount(self.patches[:, 0], minlength=self.batch)
            return per_patch * self.sites_per_side(stride) ** 2
        return self._cached(("rows_per_image", stride), build)

    def canvas_shape(self, stride: int) -> tuple[int, int, int]:
        """(B, h, w): the whole images' site grid at ``stride``."""
        s = self.sites_per_side(stride)
        return self.batch, self.grid[0] * s, self.grid[1] * s

    def canvas_index(self, stride: int) -> Tensor:
        """(N,) int64: each row's position in the flattened (B, h, w) site grid at ``stride``."""
        def build():
            _, h, w = self.canvas_shape(stride)
            c = self.coordinates(stride).long()
            return (c[:, 0] * h + c[:, 1] // stride) * w + c[:, 2] // stride
        return self._cached(("canvas_index", stride), build)

    def neighbours(self) -> Tensor:
        """(P, 3, 3): the index of each patch's neighbouring patches (itself at [1, 1]), -1 where
        hidden or outside the image."""
        def build():
            b, pr, pc = self.patches.unbind(1)
            index = torch.full((self.batch, self.grid[0] + 2, self.grid[1] + 2), -1, device=self.device)
            index[b, pr + 1, pc + 1] = torch.arange(len(b), device=self.device)
            d = torch.arange(3, device=self.device)
            return index[b.view(-1, 1, 1), pr.view(-1, 1, 1) + d.view(3, 1), pc.view(-1, 1, 1) + d]
        return self._cached(("neighbours",), build)

    def tile(self, stride: int, start: int, size: int) -> Tile:
        """The tile table of every patch: ``size`` sites per side from ``start`` (relative to the
        patch corner, negative for a halo), reaching at most into the neighbouring patches."""
        def build():
            s, n = self.sites_per_side(stride), self.num_rows(stride)
            steps = torch.arange(start, start + size, device=self.device)
            if start < -s or start + size > 2 * s:
                raise ValueError(f"a tile of {size} sites from {start} reaches beyond the neighbours "
                                 f"of a {s}x{s} block")
            which = torch.div(steps, s, rounding_mode="floor")  # -1, 0, 1: neighbour along the axis
            site = steps - which * s  # the site inside that patch
            patch = self.neighbours()[:, which.view(-1, 1) + 1, which + 1]  # (P, size, size)
            rows = (patch * (s * s) + site.view(-1, 1) * s + site).masked_fill_(patch < 0, n).view(-1).int()
            present = (patch >= 0).view(-1)
            inside = (steps >= 0) & (steps < s)
            halo = (~(inside.view(-1, 1) & inside)).view(1, -1) & present.view(-1, size * size)
            positions = halo.view(-1).nonzero()[:, 0].int()  # int32: the tables are a batch's
            return Tile(rows, start, size, s, rows.masked_fill(~present, 0), (~present).nonzero()[:, 0],
                        positions, rows.index_select(0, positions))
        return self._cached(("tile", stride, start, size), build)

    def windows(self, stride: int, kernel_size: int, conv_stride: int, padding: int | None = None) -> Tensor:
        """(N_out, K) input rows of each output site's window, in ME's kernel order (first axis
        fastest), N where absent: the im2col table, cut from the tile table (``padding``: as
        for ``tile_geometry``)."""
        padding = centred_padding(kernel_size) if padding is None else padding

        def build():
            start, size = tile_geometry(self.sites_per_side(stride), kernel_size, conv_stride, padding)
            tiles = self.tile(stride, start, size).rows.view(-1, size, size)
            win = tiles.unfold(1, kernel_size, conv_stride).unfold(2, kernel_size, conv_stride)
            return win.transpose(-1, -2).reshape(-1, kernel_size * kernel_size).contiguous()
        return self._cached(("windows", stride, kernel_size, conv_stride, padding), build)

    def pairs(self, stride: int, kernel_size: int, conv_stride: int, padding: int | None = None) -> list[OffsetPairs]:
        """Per kernel offset, the pairs whose input site is present (a sparse convolution's kernel
        map); offsets every output has come first."""
        padding = centred_padding(kernel_size) if padding is None else padding

        def build():
            table = self.windows(stride, kernel_size, conv_stride, padding)
            n_in = self.num_rows(stride)
            identity = (torch.arange(table.shape[0], dtype=table.dtype, device=self.device)
                        if conv_stride == 1 else None)
            pairs = []
            for k, col in enumerate(table.unbind(1)):
                present = col != n_in
                if bool(present.all()):
                    same = identity is not None and torch.equal(col, identity)
                    pairs.append(OffsetPairs(k, None, None if same else col))
                else:
                    rows = present.nonzero()[:, 0]
                    pairs.append(OffsetPairs(k, rows, col.index_select(0, rows)))
            return sorted(pairs, key=lambda p: p.out is not None)
        return self._cached(("pairs", stride, kernel_size, conv_stride, padding), build)
