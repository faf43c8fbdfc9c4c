"""Where the visible sites of one batch are, at every stride: coordinates, ME keys, index tables.

A SparK mask keeps whole 32x32-pixel patches, so at stride s the visible sites form whole
S x S blocks (S = 32 / s). Rows of every feature matrix are kept patch-major (patch, row in
patch, column in patch); ``PatchSites`` (one per batch, held by the batch's ``BatchCoordinates``
and shared by all layers) names each stride's sites with a MinkowskiEngine key and builds, once
per batch, the tables the operators of patch_conv.py index with. A table is a tensor of row
numbers where N (one past the last row) stands for an absent site.

Devices: the visible patches are known on the CPU (from the mask), MinkowskiEngine's coordinate
manager is its CPU build's, and the tables are built there and copied, pinned and without
blocking, to the features' device (``PatchSites.device``), those of a batch planned like an
earlier one in one copy (tiles, the largest, as their small parts, from which the device makes
them): nothing of the bookkeeping waits for the GPU. The operators read only the tables, never
MinkowskiEngine's coordinates, so a map is inserted into the manager only when something reads
its coordinates (``x.C``), or, for MinkowskiEngine's own modules which read them in C++, as soon
as it is named (``insert=True``).
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import MinkowskiEngine as ME
import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from ..transfer import to_device

STRING_ID = "patch"  # our coordinate maps (ME's own strided modules name theirs after their input's)

# Blocks of at least this many sites per side run k x k convolutions on tiles; smaller ones (the
# deeper stages, where a tile would be mostly halo) as offset GEMMs or on a per-image canvas.
# Measured by benchmarks/conv_paths.py: tiles win at 8x8 blocks, are within 10% at 4x4.
TILE_MIN_SITES = 8


class Tile(NamedTuple):
    """Each patch's ``size`` x ``size`` neighbourhood, starting ``start`` sites before its corner.
    Every tensor's shape follows from the number of patches alone, never from which neighbours
    are present: a step captured on one batch (a CUDA graph) replays on another's tables."""

    rows: Tensor  # (P * size * size,) int32: the row at each tile position, N where absent
    start: int
    size: int
    sites: int  # sites per side of the patch itself
    present_rows: Tensor  # ``rows`` with, where absent, the row patch 0 has there (overwritten after gathering) ...
    absent: Tensor  # ... where this (P * size * size, 1) bool is true
    halo_positions: Tensor  # every position outside the patch itself ...
    halo_rows: Tensor  # ... ``present_rows`` there: where a tile's gradient spills into other patches ...
    halo_absent: Tensor  # ... but for these (P * halo, 1) bool


class TileParts(NamedTuple):
    """What a tile table is made of (``tile_from_parts``): each patch's 3 x 3 neighbours and each
    tile position's place among them, kilobytes where the table is megabytes (ResNet-50's stem
    at batch 64: 20 MB). A GPU gets these and makes the table itself."""

    first_row: Tensor  # (P, 9) int32: the first row of each patch's neighbours (itself at 4), 0 where absent
    absent: Tensor  # (P, 9) bool: which neighbours are hidden or outside the image
    patch: Tensor  # (P, 1) int32: each patch's number
    cell: Tensor  # (size * size,) int32: the neighbour each tile position lies in
    local: Tensor  # (size * size,) int32: the position's row inside that neighbour
    halo: Tensor  # (halo,) int32: the positions outside the patch itself
    start: int
    size: int
    sites: int
    num_rows: int


def tile_from_parts(parts: TileParts) -> Tile:
    """The tile table, on the parts' device, in seven queued operations (gathers and elementwise
    work: nothing reads the device back). A position whose neighbour is absent reads patch 0's row
    there: a row that exists, in a table whose every entry is one whatever the mask."""
    present_rows = parts.first_row.index_select(1, parts.cell).add_(parts.local).view(-1)
    absent = parts.absent.index_select(1, parts.cell).view(-1, 1)
    positions = torch.add(parts.halo, parts.patch, alpha=parts.size**2).view(-1)  # int32: the tables are a batch's
    return Tile(present_rows.masked_fill(absent.view(-1), parts.num_rows), parts.start, parts.size, parts.sites,
                present_rows, absent, positions, present_rows.index_select(0, positions),
                absent.index_select(0, positions))


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

    def __init__(self, coordinate_map_type: ME.CoordinateMapType = ME.CoordinateMapType.CPU,
                 network: "BatchCoordinates | None" = None) -> None:
        # MinkowskiEngine sets OpenMP's threads to its num_threads (by default every core, at most
        # 20), which are torch's too: a run's `threads` setting would be lost at its first batch
        super().__init__(D=2, num_threads=torch.get_num_threads(), coordinate_map_type=coordinate_map_type)
        self.on_cuda = coordinate_map_type == ME.CoordinateMapType.CUDA
        self.network = network
        self.sites: PatchSites | None = None

    def has_map(self, key: ME.CoordinateMapKey) -> bool:
        stride, _ = key.get_key()
        return any(k.get_key() == key.get_key() for k in self._manager.get_coordinate_map_keys(stride))

    def get_coordinates(self, key_or_tensor_strides) -> Tensor:
        """MinkowskiEngine's coordinates of a map (what ``x.C`` reads); a map our sites named
        without inserting it is inserted now, at its first read."""
        if isinstance(key_or_tensor_strides, ME.CoordinateMapKey) and self.sites is not None:
            self.sites.insert_if_absent(self, key_or_tensor_strides)
        return super().get_coordinates(key_or_tensor_strides)


def _shape_of(leaf):
    """What a replayed step fixes of a table's part: a tensor's shape (its values are copied), any other value."""
    return ("tensor", leaf.shape) if isinstance(leaf, Tensor) else leaf


def tile_fits(sites_per_side: int, start: int, size: int) -> bool:
    """Whether a tile stays within a block's neighbours (the tables reach no further)."""
    return -sites_per_side <= start and start + size <= 2 * sites_per_side


def _check_tile(sites_per_side: int, start: int, size: int) -> None:
    if not tile_fits(sites_per_side, start, size):
        raise ValueError(f"a tile of {size} sites from {start} reaches beyond the neighbours "
                         f"of a {sites_per_side}x{sites_per_side} block")


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
    reaches a stride-2 layer with): its window starts one site later. A tile holds its whole
    patch, even where the windows skip sites (MViTv2's 3x3 at stride 4): its backward scatters
    the tile's gradient back onto every row of the patch."""
    start = -(centred_padding(kernel_size) if padding is None else padding)
    size = max((sites_per_side // stride - 1) * stride + kernel_size, sites_per_side - start)
    return start, size


def halo_of_tile(start: int, size: int, sites: int) -> Tensor:
    """(halo,) int32: the positions of a ``size`` x ``size`` tile outside its patch (geometry only)."""
    steps = torch.arange(start, start + size)
    inside = (steps >= 0) & (steps < sites)
    return (~(inside.view(-1, 1) & inside)).view(-1).nonzero()[:, 0].int()


class PatchSites:
    """Coordinates, ME keys and index tables of one batch's visible patches, at every stride."""

    def __init__(self, manager: BatchCoordinates, patches: Tensor, patch_size: int,
                 grid: tuple[int, int], batch: int, device: torch.device | str = "cpu", insert: bool = False):
        # the manager of the layers' maps (strides > 1; sparsify keeps the pixels' map apart);
        # it holds the sites (``attach``): a weak link back, so that no reference cycle keeps a
        # batch's coordinate maps alive until the garbage collector happens to run
        self._manager = weakref.ref(manager)
        if patches.device.type != "cpu":
            raise ValueError(f"the visible patches must be on the CPU, where the tables are built; got {patches.device}")
        self.patches = patches  # (P, 3) int64: batch, patch row, patch column; the row order of everything
        self.device = torch.device(device)  # of every table: the features' device
        self.insert = insert  # insert each map into MinkowskiEngine's manager when named, not when read
        self.patch_size = patch_size
        self.grid = grid
        self.batch = batch
        self.keys: dict[int, ME.CoordinateMapKey] = {}
        self._cache: dict[tuple, object] = {}  # tables on the CPU
        self._on_device: dict[tuple, object] = {}  # the same tables on ``device``

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
        """(N, 3) int32 coordinates (batch, row, column in input pixels) at ``stride``, patch-major,
        on the CPU (MinkowskiEngine's manager keeps them there)."""
        s, p = self.sites_per_side(stride), self.patches.int()
        steps = torch.arange(s, dtype=torch.int32) * stride
        rows = (p[:, 1:2] * self.patch_size + steps).view(-1, s, 1).expand(-1, s, s)
        cols = (p[:, 2:3] * self.patch_size + steps).view(-1, 1, s).expand(-1, s, s)
        return torch.stack([p[:, 0].view(-1, 1, 1).expand(-1, s, s), rows, cols], -1).view(-1, 3)

    def key(self, stride: int, manager: BatchCoordinates | None = None) -> ME.CoordinateMapKey:
        """The key of the sites at ``stride`` (in ``manager``, by default the layers' one). Only
        with ``insert`` are the coordinates inserted now; otherwise at their first read."""
        if stride not in self.keys:
            if self.insert:
                self.keys[stride] = self._insert(manager or self.manager, stride)
            else:
                self.keys[stride] = ME.CoordinateMapKey([stride, stride], STRING_ID)
        return self.keys[stride]

    def _insert(self, manager: BatchCoordinates, stride: int) -> ME.CoordinateMapKey:
        # unique by construction: inserted directly, without MinkowskiEngine's quantisation
        coords = self.coordinates(stride)
        if manager.on_cuda:  # a CUDA build's own modules keep their maps on the GPU
            coords = coords.to(self.device)
        key, _ = manager.insert_and_map(coords, [stride, stride], STRING_ID)
        return key

    def insert_if_absent(self, manager: BatchCoordinates, key: ME.CoordinateMapKey) -> None:
        """Insert the map of ``key`` into ``manager`` if these sites named it and it is not there."""
        stride = key.get_key()[0][0]
        ours = self.keys.get(stride)
        if ours is not None and ours.get_key() == key.get_key() and not manager.has_map(key):
            self._insert(manager, stride)

    def holds_rows_of(self, x: ME.SparseTensor) -> bool:
        """Whether ``x``'s rows are these sites in patch-major order, as every table assumes: a map
        these sites named (one that MinkowskiEngine's own strided modules made has its own order)."""
        ours = self.keys.get(x.tensor_stride[0])
        return ours is not None and ours.get_key() == x.coordinate_map_key.get_key()

    # -- index tables: ``_build_<name>(*args)`` makes one on the CPU, ``_table`` hands it out on
    # the features' device; both keep it for the rest of the batch
    def _cached(self, *key):
        """The table ``(name, *args)`` on the CPU, where tables are built from other tables."""
        if key not in self._cache:
            self._cache[key] = getattr(self, f"_build_{key[0]}")(*key[1:])
        return self._cache[key]

    def _table(self, *key):
        """The table ``(name, *args)`` on the features' device, made there once."""
        if key not in self._on_device:
            self._make_on_device([key])
        return self._on_device[key]

    def _make_on_device(self, keys: list[tuple]) -> None:
        """Make the tables ``keys`` on the features' device from what the CPU built, all of it in
        one copy: the tables themselves, but for tiles (the largest) their parts, from which the
        device makes them."""
        from_parts = {key for key in keys if key[0] == "tile" and self.device.type != "cpu"}
        sources = {key: self._cached("tile_parts", *key[1:]) if key in from_parts else self._cached(*key)
                   for key in keys}
        for key, value in to_device(sources, self.device).items():
            self._on_device[key] = tile_from_parts(value) if key in from_parts else value

    def tables(self) -> list[tuple]:
        """The keys of the tables handed out so far (what the batch's layers read)."""
        return list(self._on_device)

    def build_like(self, earlier: "PatchSites") -> None:
        """Make now, on the features' device, every table ``earlier`` (a batch of the same model)
        handed out: this batch's layers then find theirs made, and on a GPU they were made (one
        copy) while it still ran the earlier batch."""
        self._make_on_device([key for key in earlier._on_device if key not in self._on_device])

    def copy_tables_(self, other: "PatchSites") -> None:
        """Overwrite, in place, every table handed out so far with ``other``'s (a batch of as many
        visible patches per image, planned ``like`` this one): operators whose work was captured
        reading these tables (a CUDA graph) then compute ``other``'s batch. Device-to-device
        copies, queued: nothing waits for the GPU."""
        if (other.batch, other.grid, other.patch_size, other.device) != (self.batch, self.grid, self.patch_size,
                                                                       self.device):
            raise ValueError(f"the new batch is {other.batch} images of {other.grid} patches on {other.device}, "
                             f"not {self.batch} of {self.grid} on {self.device}")
        if other.patches.shape != self.patches.shape:
            raise ValueError(f"the new batch has {len(other.patches)} visible patches, not {len(self.patches)}: "
                             f"a replayed step needs as many in every batch (the mask ratio fixes them)")
        for key, table in self._on_device.items():
            mine, spec = tree_flatten(table)
            theirs, their_spec = tree_flatten(other._table(*key))  # made now unless planned like this batch
            if (spec, [_shape_of(a) for a in mine]) != (their_spec, [_shape_of(b) for b in theirs]):
                raise ValueError(f"table {key} differs in shape in the new batch (offset pairs, the CPU's "
                                 f"small-block path, vary from batch to batch; window GEMMs do not)")
            for a, b in zip(mine, theirs):
                if isinstance(a, Tensor):
                    a.copy_(b, non_blocking=True)
        self.patches.copy_(other.patches)

    def image_of_rows(self, stride: int) -> Tensor:
        """(N,) int64: the image each row at ``stride`` belongs to (rows of an image are contiguous)."""
        return self._table("image_of_rows", stride)

    def _build_image_of_rows(self, stride: int) -> Tensor:
        return self.patches[:, 0].repeat_interleave(self.sites_per_side(stride) ** 2)

    def patch_index(self) -> Tensor:
        """(P,) int64: each visible patch's flat (image, patch row, patch column) index, where
        ``sparsify`` finds its pixels."""
        return self._table("patch_index")

    def _build_patch_index(self) -> Tensor:
        b, r, c = self.patches.unbind(1)
        return (b * self.grid[0] + r) * self.grid[1] + c

    def image_of_patches(self) -> Tensor:
        """(P,) int64: the image each visible patch belongs to."""
        return self._table("image_of_patches")

    def _build_image_of_patches(self) -> Tensor:
        return self.patches[:, 0]

    def mean_divisors(self, stride: int) -> Tensor:
        """(B,) float32: how many rows each image has at ``stride``, 1 for a wholly hidden one
        (whose mean is then its sum, zero): what a per-image mean over visible rows divides by."""
        return self._table("mean_divisors", stride)

    def _build_mean_divisors(self, stride: int) -> Tensor:
        rows = torch.bincount(self.patches[:, 0], minlength=self.batch) * self.sites_per_side(stride) ** 2
        return rows.clamp_min(1).float()

    def image_slots(self, stride: int) -> tuple[Tensor, Tensor]:
        """Each image's rows at ``stride`` side by side, as (B, n, C) tokens: (N,) int64, each row's
        slot in the flattened (B, n) grid, n the most rows an image has (every image, for SparK's
        masks), and (B, n) bool, which slots hold a row."""
        return self._table("image_slots", stride)

    def _build_image_slots(self, stride: int) -> tuple[Tensor, Tensor]:
        rows = torch.bincount(self.patches[:, 0], minlength=self.batch) * self.sites_per_side(stride) ** 2
        n = max(int(rows.max()), 1)
        image = self._cached("image_of_rows", stride)
        first = rows.cumsum(0) - rows  # rows of an image are contiguous
        slots = image * n + torch.arange(len(image)) - first.index_select(0, image)
        return slots, torch.arange(n) < rows[:, None]

    def group_positions(self, stride: int, window: int) -> Tensor:
        """(B, n) int64: for each ``image_slots`` slot, its site's position in a ``window`` x
        ``window`` group laid from its image's top-left corner (site (y, x) at y * window + x), 0
        in empty slots: where attention's bias per relative offset is read, on maps of one group."""
        return self._table("group_positions", stride, window)

    def _build_group_positions(self, stride: int, window: int) -> Tensor:
        slots, present = self._cached("image_slots", stride)
        c = self.coordinates(stride).long() // stride
        positions = torch.zeros(present.numel(), dtype=torch.long)
        return positions.index_copy_(0, slots, c[:, 1] * window + c[:, 2]).view(present.shape)

    def group_slots(self, stride: int, window: int, shift: int = 0) -> tuple[Tensor, Tensor]:
        """Each image's site grid at ``stride`` in groups of ``window`` x ``window`` sites laid from
        its top-left corner (the grid started ``shift`` sites in; partial groups at the borders):
        (N,) int64, each row's slot in the flattened (G, window ** 2) groups, sites row by row in
        each, and (G, window ** 2) bool, which slots hold a row. G depends on the batch's size alone."""
        return self._table("group_slots", stride, window, shift)

    def _build_group_slots(self, stride: int, window: int, shift: int) -> tuple[Tensor, Tensor]:
        b, h, w = self.canvas_shape(stride)
        lead = -shift % window
        gh, gw = -(-(lead + h) // window), -(-(lead + w) // window)
        c = self.coordinates(stride).long()
        y, x = c[:, 1] // stride + lead, c[:, 2] // stride + lead
        group = (c[:, 0] * gh + y // window) * gw + x // window
        slots = (group * window + y % window) * window + x % window
        present = torch.zeros(b * gh * gw * window * window, dtype=torch.bool).index_fill_(0, slots, True)
        return slots, present.view(b * gh * gw, window * window)

    def grid_slots(self, stride: int, block: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """Each image's sites at ``stride`` grouped by their offset in the bh x bw ``block``s that
        tile its grid (MobileViT's and MaxViT's grids), a group's rows side by side in the order of
        their blocks: (N,) int64, each row's slot in the flattened (G, n) groups; (G, n) bool, which
        slots hold a row; (G, n) int64, each slot's block (row by row over the grid), 0 where empty.
        G = B * bh * bw; n, the most rows a group can hold given each image's visible patches (a
        group has at most ceil(s / bh) * ceil(s / bw) sites in a patch of s x s): shapes that depend
        on the batch's size and visible patches per image alone, as a replayed step needs."""
        return self._table("grid_slots", stride, *block)

    def _build_grid_slots(self, stride: int, bh: int, bw: int) -> tuple[Tensor, Tensor, Tensor]:
        b, h, w = self.canvas_shape(stride)
        s = self.sites_per_side(stride)
        per_patch = -(-s // bh) * -(-s // bw)
        most_patches = int(torch.bincount(self.patches[:, 0], minlength=b).max())
        n = max(min((h // bh) * (w // bw), most_patches * per_patch), 1)
        c = self.coordinates(stride).long()
        y, x = c[:, 1] // stride, c[:, 2] // stride
        group = (c[:, 0] * bh + y % bh) * bw + x % bw
        place = (y // bh) * (w // bw) + x // bw
        order = torch.argsort(group * (h * w) + place)  # by group, then by block
        counts = torch.bincount(group, minlength=b * bh * bw)
        first = counts.cumsum(0) - counts
        sorted_group = group.index_select(0, order)
        slots = torch.empty_like(order).index_copy_(
            0, order, sorted_group * n + torch.arange(len(order)) - first.index_select(0, sorted_group))
        present = torch.zeros(len(counts) * n, dtype=torch.bool).index_fill_(0, slots, True)
        places = torch.zeros(len(counts) * n, dtype=torch.long).index_copy_(0, slots, place)
        return slots, present.view(-1, n), places.view(-1, n)

    def canvas_shape(self, stride: int) -> tuple[int, int, int]:
        """(B, h, w): the whole images' site grid at ``stride``."""
        s = self.sites_per_side(stride)
        return self.batch, self.grid[0] * s, self.grid[1] * s

    def canvas_index(self, stride: int) -> Tensor:
        """(N,) int64: each row's position in the flattened (B, h, w) site grid at ``stride``."""
        return self._table("canvas_index", stride)

    def _build_canvas_index(self, stride: int) -> Tensor:
        _, h, w = self.canvas_shape(stride)
        c = self.coordinates(stride).long()
        return (c[:, 0] * h + c[:, 1] // stride) * w + c[:, 2] // stride

    def tiled_rows(self, stride: int, coarse: int) -> Tensor:
        """(N,) int64: for each row at ``stride``, the row at ``coarse`` whose map, an h x w grid of
        tokens, tiles the finer map: site (y, x) takes token (y % h, x % w) of its image (GCViT's
        global queries), N at ``coarse`` where that token is hidden; the finer map's sides are
        multiples of h and w (its caller checks)."""
        return self._table("tiled_rows", stride, coarse)

    def _build_tiled_rows(self, stride: int, coarse: int) -> Tensor:
        b, th, tw = self.canvas_shape(coarse)
        n = self.num_rows(coarse)
        token = torch.full((b * th * tw,), n, dtype=torch.long)
        token.index_copy_(0, self._cached("canvas_index", coarse), torch.arange(n))
        c = self.coordinates(stride).long()
        return token.index_select(0, (c[:, 0] * th + c[:, 1] // stride % th) * tw + c[:, 2] // stride % tw)

    def _build_neighbours(self) -> Tensor:
        """(P, 3, 3): the index of each patch's neighbouring patches (itself at [1, 1]), -1 where
        hidden or outside the image."""
        b, pr, pc = self.patches.unbind(1)
        index = torch.full((self.batch, self.grid[0] + 2, self.grid[1] + 2), -1)
        index[b, pr + 1, pc + 1] = torch.arange(len(b))
        d = torch.arange(3)
        return index[b.view(-1, 1, 1), pr.view(-1, 1, 1) + d.view(3, 1), pc.view(-1, 1, 1) + d]

    def tile(self, stride: int, start: int, size: int) -> Tile:
        """The tile table of every patch: ``size`` sites per side from ``start`` (relative to the
        patch corner, negative for a halo), reaching at most into the neighbouring patches."""
        return self._table("tile", stride, start, size)

    def _build_tile(self, stride: int, start: int, size: int) -> Tile:
        return tile_from_parts(self._cached("tile_parts", stride, start, size))

    def _build_tile_parts(self, stride: int, start: int, size: int) -> TileParts:
        """A tile position lies in one of the 3 x 3 cells of the patch and its neighbours: its row
        is that neighbour's first row plus the position's fixed row inside it."""
        s = self.sites_per_side(stride)
        _check_tile(s, start, size)
        steps = torch.arange(start, start + size)
        which = torch.div(steps, s, rounding_mode="floor") + 1  # 0, 1, 2: the neighbour along the axis
        site = steps - (which - 1) * s  # the site inside that patch
        cell = (which.view(-1, 1) * 3 + which).view(-1)
        local = (site.view(-1, 1) * s + site).view(-1)
        neighbours = self._cached("neighbours").view(-1, 9)  # -1 where absent
        patch = torch.arange(len(neighbours), dtype=torch.int32).view(-1, 1)
        return TileParts((neighbours.clamp(min=0) * (s * s)).int(), neighbours < 0, patch, cell.int(), local.int(),
                         halo_of_tile(start, size, s), start, size, s, self.num_rows(stride))

    def reflected_tile(self, stride: int, start: int, size: int) -> Tile:
        """``tile``'s table, its positions above and left of an image read by reflection (a blur
        pool's padding): a patch on the image's first row of patches reads its own row -r at a
        halo row r < 0, one on the first column its own column -r (both at the corner)."""
        return self._table("reflected_tile", stride, start, size)

    def _build_reflected_tile(self, stride: int, start: int, size: int) -> Tile:
        s = self.sites_per_side(stride)
        if start + size > s or -start >= s:
            raise ValueError(f"a reflected tile reflects above and left only, within the patch: {size} sites "
                             f"from {start} in a {s}x{s} block")
        tile = self._cached("tile", stride, start, size)
        top, left = self.patches[:, 1] == 0, self.patches[:, 2] == 0

        def reflected(t: Tensor) -> Tensor:
            t = t.view(-1, size, size).clone()
            for r in range(start, 0):
                t[top, r - start] = t[top, -r - start]
            for r in range(start, 0):
                t[left, :, r - start] = t[left, :, -r - start]
            return t.view(-1)

        present_rows, absent = reflected(tile.present_rows), reflected(tile.absent).view(-1, 1)
        halo = tile.halo_positions
        return tile._replace(rows=reflected(tile.rows), present_rows=present_rows, absent=absent,
                             halo_rows=present_rows.index_select(0, halo), halo_absent=absent.index_select(0, halo))

    def windows(self, stride: int, kernel_size: int, conv_stride: int, padding: int | None = None) -> Tensor:
        """(N_out, K) input rows of each output site's window, in ME's kernel order (first axis
        fastest), N where absent: the im2col table, cut from the tile table (``padding``: as
        for ``tile_geometry``)."""
        padding = centred_padding(kernel_size) if padding is None else padding
        return self._table("windows", stride, kernel_size, conv_stride, padding)

    def _build_windows(self, stride: int, kernel_size: int, conv_stride: int, padding: int) -> Tensor:
        start, size = tile_geometry(self.sites_per_side(stride), kernel_size, conv_stride, padding)
        tiles = self._cached("tile", stride, start, size).rows.view(-1, size, size)
        win = tiles.unfold(1, kernel_size, conv_stride).unfold(2, kernel_size, conv_stride)
        return win.transpose(-1, -2).reshape(-1, kernel_size * kernel_size).contiguous()

    def pairs(self, stride: int, kernel_size: int, conv_stride: int, padding: int | None = None) -> list[OffsetPairs]:
        """Per kernel offset, the pairs whose input site is present (a sparse convolution's kernel
        map); offsets every output has come first."""
        padding = centred_padding(kernel_size) if padding is None else padding
        return self._table("pairs", stride, kernel_size, conv_stride, padding)

    def _build_pairs(self, stride: int, kernel_size: int, conv_stride: int, padding: int) -> list[OffsetPairs]:
        table = self._cached("windows", stride, kernel_size, conv_stride, padding)
        n_in = self.num_rows(stride)
        identity = torch.arange(table.shape[0], dtype=table.dtype) if conv_stride == 1 else None
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
