"""Fast sparse convolution and pooling for SparK's patch-structured sparsity, on ME tensors.

A SparK mask keeps whole 32x32-pixel patches, so at every scale the visible sites form whole
S x S blocks (S = 32 / stride). Each block, with a halo of its neighbours (absent neighbours
read as zero, exactly as a sparse convolution ignores them), is a small dense tile; one batched
dense convolution over all tiles computes every visible output site and nothing else. This is
the block-sparse "gather tiles, dense kernel" scheme: the arithmetic is that of a submanifold
(or strided) sparse convolution, but it runs in oneDNN's tuned convolution kernels instead of
MinkowskiEngine's per-offset gather/GEMM/scatter loop.

Rows of every feature matrix are kept patch-major (patch, row in patch, column in patch), so a
tile convolution's output needs no scatter: it *is* the next feature matrix. ``PatchSites``
(one per batch, kept on the batch's coordinate manager and shared by all layers) registers those
coordinates with MinkowskiEngine once per stride and caches the tile index tables. Tensors in
and out stay ``MinkowskiEngine.SparseTensor``s.
"""

from __future__ import annotations

import MinkowskiEngine as ME
import torch
import torch.nn.functional as F
from torch import Tensor, nn

STRING_ID = "patch"  # our coordinate maps, never confused with ones ME builds itself
PAD = 4  # halo room in the row grids: enough for a 7x7 kernel (3) and pooling


class PatchSites:
    """Coordinates, ME keys and tile tables of one batch's visible patches, at every stride."""

    def __init__(self, manager: ME.CoordinateManager, patches: Tensor, patch_size: int, grid: tuple[int, int],
                 batch: int):
        self.manager = manager
        self.patches = patches  # (P, 3): batch, patch row, patch column; the row order of everything
        self.patch_size = patch_size
        self.grid = grid
        self.batch = batch
        self.keys: dict[int, ME.CoordinateMapKey] = {}
        self.rows: dict[int, Tensor] = {}
        self.tiles: dict[tuple[int, int, int], Tensor] = {}

    @staticmethod
    def of(x: ME.SparseTensor) -> "PatchSites":
        sites = x.coordinate_manager.__dict__.get("_patch_sites")
        if sites is None:
            raise ValueError("patch convolutions need a SparseTensor made by spark_sparse.sparsify "
                             "(mask-aligned patches); use conv='minkowski' for arbitrary sparse tensors")
        return sites

    def attach(self) -> None:
        self.manager.__dict__["_patch_sites"] = self

    def sites_per_side(self, stride: int) -> int:
        return self.patch_size // stride

    def coordinates(self, stride: int) -> Tensor:
        """(N, 3) int32 coordinates at ``stride``, patch-major."""
        s = self.sites_per_side(stride)
        i = torch.arange(s).repeat_interleave(s)
        j = torch.arange(s).repeat(s)
        b, pr, pc = (self.patches[:, k, None] for k in range(3))
        rows = ((pr * s + i) * stride).reshape(-1)
        cols = ((pc * s + j) * stride).reshape(-1)
        return torch.stack([b.expand(-1, s * s).reshape(-1), rows, cols], 1).int().contiguous()

    def key(self, stride: int) -> ME.CoordinateMapKey:
        if stride not in self.keys:
            key, _ = self.manager.insert_and_map(self.coordinates(stride), [stride, stride], STRING_ID)
            self.keys[stride] = key
        return self.keys[stride]

    def row_grid(self, stride: int) -> Tensor:
        """(B, h + 2 PAD, w + 2 PAD) int32: each site's row number, N (a fill row) where absent."""
        if stride not in self.rows:
            s = self.sites_per_side(stride)
            n = self.patches.shape[0] * s * s
            grid = torch.full((self.batch, self.grid[0] * s + 2 * PAD, self.grid[1] * s + 2 * PAD), n,
                              dtype=torch.int32)
            c = self.coordinates(stride).long()
            grid[c[:, 0], c[:, 1] // stride + PAD, c[:, 2] // stride + PAD] = torch.arange(n, dtype=torch.int32)
            self.rows[stride] = grid
        return self.rows[stride]

    def tile_rows(self, stride: int, start: int, size: int) -> Tensor:
        """(P * size * size,) rows of each patch's tile: ``size`` sites per side from ``start``
        (relative to the patch corner, negative for a halo)."""
        cache_key = (stride, start, size)
        if cache_key not in self.tiles:
            s = self.sites_per_side(stride)
            grid = self.row_grid(stride)
            b, pr, pc = (self.patches[:, k].int() for k in range(3))
            corner = (b * grid.shape[1] + pr * s + start + PAD) * grid.shape[2] + pc * s + start + PAD
            steps = torch.arange(size, dtype=torch.int32)
            offsets = (steps[:, None] * grid.shape[2] + steps[None, :]).view(-1)
            self.tiles[cache_key] = grid.view(-1).index_select(0, (corner[:, None] + offsets).view(-1))
        return self.tiles[cache_key]


def gather_tiles(x: ME.SparseTensor, start: int, size: int, fill: float = 0.0) -> Tensor:
    """Every patch's tile as a (P, C, size, size) batch (channels-last in memory)."""
    rows = PatchSites.of(x).tile_rows(x.tensor_stride[0], start, size)
    return _select_rows(x.F, rows, fill).view(-1, size, size, x.F.shape[1]).permute(0, 3, 1, 2)


def _select_rows(feats: Tensor, rows: Tensor, fill: float = 0.0) -> Tensor:
    """feats[rows] where row index N (one past the end) reads as a row of ``fill``."""
    padded = torch.cat([feats, feats.new_full((1, feats.shape[1]), fill)])
    return padded.index_select(0, rows.view(-1))


def tiles_to_sparse(tiles: Tensor, x: ME.SparseTensor, out_stride: int) -> ME.SparseTensor:
    """(P, C, s, s) outputs back to patch-major rows of a SparseTensor at ``out_stride``."""
    feats = tiles.permute(0, 2, 3, 1).reshape(-1, tiles.shape[1])
    key = PatchSites.of(x).key(out_stride)
    return ME.SparseTensor(feats, coordinate_map_key=key, coordinate_manager=x.coordinate_manager)


def tile_geometry(sites_per_side: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """(start, size) of the input tile whose valid convolution gives the patch's outputs."""
    start = -(kernel_size // 2) if kernel_size % 2 else 0
    size = (sites_per_side // stride - 1) * stride + kernel_size
    return start, size


def window_rows(x: ME.SparseTensor, kernel_size: int, stride: int) -> Tensor:
    """(N_out, K) input rows of each output site's window, in ME's kernel order (first axis
    fastest), N_in where absent: the im2col table, cut from the tiles' index tables."""
    sites = PatchSites.of(x)
    s = sites.sites_per_side(x.tensor_stride[0])
    start, size = tile_geometry(s, kernel_size, stride)
    cache_key = ("window", x.tensor_stride[0], kernel_size, stride)
    if cache_key not in sites.tiles:
        tiles = sites.tile_rows(x.tensor_stride[0], start, size).view(-1, size, size)
        windows = tiles.unfold(1, kernel_size, stride).unfold(2, kernel_size, stride)  # (P, s', s', ki, kj)
        sites.tiles[cache_key] = windows.transpose(-1, -2).reshape(-1, kernel_size * kernel_size).contiguous()
    return sites.tiles[cache_key]


def _gather_rows(feats: Tensor, table: Tensor) -> Tensor:
    """Each output site's window of input rows, absent ones zero, as (N_out, K * C)."""
    return _select_rows(feats, table).view(table.shape[0], -1)


class GatherGemm(torch.autograd.Function):
    """One GEMM over all kernel offsets; backward recomputes the gather instead of keeping it
    (it is K times the features). A submanifold convolution's neighbour relation is symmetric,
    so its input gradient is another gather-GEMM with the mirrored kernel, with no scatter."""

    @staticmethod
    def forward(ctx, feats: Tensor, kernel: Tensor, table: Tensor, submanifold: bool) -> Tensor:
        k, c_in, c_out = kernel.shape
        ctx.save_for_backward(feats, kernel, table)
        ctx.submanifold = submanifold
        return _gather_rows(feats, table) @ kernel.reshape(k * c_in, c_out)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        feats, kernel, table = ctx.saved_tensors
        k, c_in, c_out = kernel.shape
        grad_out = grad_out.contiguous()
        grad_feats = grad_kernel = None
        if ctx.needs_input_grad[1]:
            grad_kernel = (_gather_rows(feats, table).t() @ grad_out).view(k, c_in, c_out)
        if ctx.needs_input_grad[0]:
            if ctx.submanifold:  # i sees o at offset j exactly when o sees i at offset K-1-j
                mirrored = kernel.flip(0).transpose(1, 2).reshape(k * c_out, c_in)
                grad_feats = _gather_rows(grad_out, table) @ mirrored
            else:
                per_offset = (grad_out @ kernel.permute(2, 0, 1).reshape(c_out, k * c_in)).view(-1, c_in)
                grad_feats = feats.new_zeros(feats.shape[0] + 1, c_in)
                grad_feats.index_add_(0, table.view(-1), per_offset)
                grad_feats = grad_feats[:-1]
        return grad_feats, grad_kernel, None, None


class PatchConvolution(ME.MinkowskiConvolution):
    """Drop-in for MinkowskiConvolution (same parameters and state dict) on mask-aligned tensors.

    Patches of at least ``tile_min_sites`` sites per side run as tile convolutions; smaller ones
    (deep stages, where a tile is mostly halo) as one gather-GEMM: measured faster each way.
    1x1 convolutions are a matrix product of the (for stride 2: selected) rows.
    """

    tile_min_sites = 4

    def forward(self, x: ME.SparseTensor, coordinates=None) -> ME.SparseTensor:
        kh = int(self.kernel_generator.kernel_size[0])
        stride = int(self.kernel_generator.kernel_stride[0])
        kernel = self.kernel.view(-1, self.in_channels, self.out_channels)
        sites = PatchSites.of(x)
        s = sites.sites_per_side(x.tensor_stride[0])
        if kh == 1 or s < self.tile_min_sites:
            if kh == 1 and stride == 1:  # pointwise: no neighbours, no tiles
                out = x.F @ kernel[0]
            else:  # a strided 1x1 only picks rows; tiny blocks are mostly halo
                out = GatherGemm.apply(x.F, kernel, window_rows(x, kh, stride), stride == 1)
            if self.bias is not None:
                out = out + self.bias
            key = x.coordinate_map_key if stride == 1 else sites.key(x.tensor_stride[0] * stride)
            return ME.SparseTensor(out, coordinate_map_key=key, coordinate_manager=x.coordinate_manager)
        start, size = tile_geometry(s, kh, stride)
        # ME's (K, C_in, C_out), first spatial axis fastest -> (C_out, C_in, kh, kw)
        weight = kernel.reshape(kh, kh, self.in_channels, self.out_channels).permute(3, 2, 1, 0)
        bias = None if self.bias is None else self.bias.view(-1)
        out = F.conv2d(gather_tiles(x, start, size), weight, bias, stride=stride)
        return tiles_to_sparse(out, x, x.tensor_stride[0] * stride)


class PatchPooling(nn.Module):
    """Max (3x3, stride 2, over present sites) or average (2x2, stride 2) pooling."""

    def __init__(self, mode: str, kernel_size: int, stride: int):
        super().__init__()
        if mode not in ("max", "avg"):
            raise ValueError(f"pooling mode must be 'max' or 'avg', got '{mode}'")
        self.mode, self.kernel_size, self.stride = mode, kernel_size, stride

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        s = PatchSites.of(x).sites_per_side(x.tensor_stride[0])
        start, size = tile_geometry(s, self.kernel_size, self.stride)
        if self.mode == "max":  # absent neighbours must never win
            out = F.max_pool2d(gather_tiles(x, start, size, float("-inf")), self.kernel_size, self.stride)
        else:  # mask-aligned 2x2 windows lie inside one patch: always complete
            out = F.avg_pool2d(gather_tiles(x, start, size), self.kernel_size, self.stride)
        return tiles_to_sparse(out, x, x.tensor_stride[0] * self.stride)

    def extra_repr(self) -> str:
        return f"{self.mode}, kernel_size={self.kernel_size}, stride={self.stride}"
