"""Fused gather-GEMM sparse convolution and pooling for 2-D image grids, on MinkowskiEngine tensors.

MinkowskiEngine's CPU convolution loops over kernel offsets (gather, small GEMM, scatter each)
and builds strided coordinate maps by hashing. On an image grid both can be done with dense
index grids instead:

* ``Sites`` (one per batch, kept on the batch's coordinate manager, so all layers share it)
  derives each coarser set of sites by marking an occupancy grid, registers it with
  MinkowskiEngine once, and builds neighbour tables with one flat gather.
* A convolution gathers all kernel offsets at once into an (N_out, K*C_in) matrix and does one
  large GEMM with the kernel viewed as (K*C_in, C_out). Backward recomputes the gather rather
  than keeping a K-times-larger matrix alive; for a submanifold convolution the neighbour
  relation is symmetric, so the input gradient is one more gather-GEMM with the mirrored kernel
  and needs no scatter. Strided convolutions scatter-add their input gradient.

The tensors going in and out stay ``MinkowskiEngine.SparseTensor``s with ME's own keys.
"""

from __future__ import annotations

import MinkowskiEngine as ME
import torch
from torch import Tensor, nn

STRING_ID = "gather"  # our coordinate maps, never confused with ones ME builds itself


class Sites:
    """Coordinates, strided maps and neighbour tables of one batch, computed once each."""

    def __init__(self, manager: ME.CoordinateManager):
        self.manager = manager
        self.coords: dict[str, Tensor] = {}
        self.strided: dict[tuple[str, int], ME.CoordinateMapKey] = {}
        self.tables: dict[tuple, Tensor] = {}

    @staticmethod
    def of(x: ME.SparseTensor) -> "Sites":
        return x.coordinate_manager.__dict__.setdefault("_gather_sites", Sites(x.coordinate_manager))

    def coordinates(self, key: ME.CoordinateMapKey) -> Tensor:
        if str(key) not in self.coords:
            self.coords[str(key)] = self.manager.get_coordinates(key)
        return self.coords[str(key)]

    def stride(self, key: ME.CoordinateMapKey, factor: int) -> ME.CoordinateMapKey:
        """The map of sites ``factor`` times coarser: every cell holding at least one input site."""
        if factor == 1:
            return key
        if (str(key), factor) not in self.strided:
            coords = self.coordinates(key).long()
            out_stride = key.get_tensor_stride()[0] * factor
            b, r, c = coords[:, 0], coords[:, 1] // out_stride, coords[:, 2] // out_stride
            occupied = torch.zeros(int(b.max()) + 1, int(r.max()) + 1, int(c.max()) + 1, dtype=torch.bool)
            occupied[b, r, c] = True
            cells = occupied.nonzero()
            cells[:, 1:] *= out_stride
            new_key, _ = self.manager.insert_and_map(cells.int().contiguous(), [out_stride, out_stride], STRING_ID)
            self.coords[str(new_key)] = self.manager.get_coordinates(new_key)
            self.strided[(str(key), factor)] = new_key
        return self.strided[(str(key), factor)]

    def table(self, in_key: ME.CoordinateMapKey, out_key: ME.CoordinateMapKey, kernel_size: int) -> Tensor:
        """(N_out, K) input rows in each output site's window; N_in (a padding row) where absent.

        Offsets run -k//2..k//2 for odd kernels and 0..k-1 for even ones (ME's convention), first
        spatial axis fastest, as ME orders its kernel slices."""
        cache_key = (str(in_key), str(out_key), kernel_size)
        if cache_key not in self.tables:
            self.tables[cache_key] = _neighbour_table(
                self.coordinates(in_key), in_key.get_tensor_stride()[0], self.coordinates(out_key), kernel_size)
        return self.tables[cache_key]


def _neighbour_table(in_coords: Tensor, in_stride: int, out_coords: Tensor, kernel_size: int) -> Tensor:
    lo = kernel_size // 2 if kernel_size % 2 else 0
    n = in_coords.shape[0]
    b, r, c = (in_coords[:, i].long() // (1 if i == 0 else in_stride) for i in range(3))
    height = int(r.max()) + kernel_size
    width = int(c.max()) + kernel_size
    # int32 throughout: half the memory traffic of int64, and index_select accepts it
    grid = torch.full((int(b.max()) + 1, height, width), n, dtype=torch.int32)
    grid[b, r + lo, c + lo] = torch.arange(n, dtype=torch.int32)
    ob, orow, ocol = (out_coords[:, i].long() // (1 if i == 0 else in_stride) for i in range(3))
    base = ((ob * height + orow) * width + ocol).int()   # window corner, in the padded grid
    steps = torch.arange(kernel_size, dtype=torch.int32)
    offsets = steps.repeat(kernel_size) * width + steps.repeat_interleave(kernel_size)
    return grid.view(-1).index_select(0, (base[:, None] + offsets).view(-1)).view(-1, kernel_size**2)


def _gather(rows: Tensor, table: Tensor, fill: float = 0.0) -> Tensor:
    """rows[table] with index N meaning a row of ``fill``: (N_out, K, C)."""
    padded = torch.cat([rows, rows.new_full((1, rows.shape[1]), fill)])
    return padded.index_select(0, table.view(-1)).view(*table.shape, rows.shape[1])


class GatherConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feats: Tensor, kernel: Tensor, table: Tensor, submanifold: bool) -> Tensor:
        k, c_in, c_out = kernel.shape
        ctx.save_for_backward(feats, kernel, table)
        ctx.submanifold = submanifold
        return _gather(feats, table).view(-1, k * c_in) @ kernel.view(k * c_in, c_out)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        feats, kernel, table = ctx.saved_tensors
        k, c_in, c_out = kernel.shape
        grad_out = grad_out.contiguous()
        grad_feats = grad_kernel = None
        if ctx.needs_input_grad[1]:
            gathered = _gather(feats, table).view(-1, k * c_in)
            grad_kernel = (gathered.t() @ grad_out).view(k, c_in, c_out)
            del gathered
        if ctx.needs_input_grad[0]:
            if ctx.submanifold:
                # site i sees o at offset j exactly when o sees i at the mirrored offset K-1-j
                mirrored = kernel.flip(0).transpose(1, 2).reshape(k * c_out, c_in)
                grad_feats = _gather(grad_out, table).view(-1, k * c_out) @ mirrored
            else:
                per_offset = (grad_out @ kernel.permute(2, 0, 1).reshape(c_out, k * c_in)).view(-1, c_in)
                grad_feats = feats.new_zeros(feats.shape[0] + 1, c_in)
                grad_feats.index_add_(0, table.view(-1), per_offset)
                grad_feats = grad_feats[:-1]
        return grad_feats, grad_kernel, None, None


class GatherConvolution(ME.MinkowskiConvolution):
    """Drop-in for MinkowskiConvolution (same parameters and state dict), faster on CPU."""

    def forward(self, x: ME.SparseTensor, coordinates=None) -> ME.SparseTensor:
        stride = int(self.kernel_generator.kernel_stride[0])
        size = int(self.kernel_generator.kernel_size[0])
        kernel = self.kernel.view(-1, self.in_channels, self.out_channels)
        sites = Sites.of(x)
        out_key = sites.stride(x.coordinate_map_key, stride)
        if size == 1 and stride == 1:  # pointwise: every site is its own only neighbour
            out = x.F @ kernel[0]
        else:
            table = sites.table(x.coordinate_map_key, out_key, size)
            out = GatherConvFunction.apply(x.F, kernel, table, stride == 1)
        if self.bias is not None:
            out = out + self.bias
        return ME.SparseTensor(out, coordinate_map_key=out_key, coordinate_manager=x.coordinate_manager)


class GatherPooling(nn.Module):
    """Max or average pooling over the sites present in each window (as ME's pooling)."""

    def __init__(self, mode: str, kernel_size: int, stride: int):
        super().__init__()
        if mode not in ("max", "avg"):
            raise ValueError(f"pooling mode must be 'max' or 'avg', got '{mode}'")
        self.mode, self.kernel_size, self.stride = mode, kernel_size, stride

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        sites = Sites.of(x)
        out_key = sites.stride(x.coordinate_map_key, self.stride)
        table = sites.table(x.coordinate_map_key, out_key, self.kernel_size)
        present = table < x.F.shape[0]
        if self.mode == "max":
            out = _gather(x.F, table, float("-inf")).max(dim=1).values
        else:
            out = _gather(x.F, table).sum(dim=1) / present.sum(dim=1, keepdim=True).to(x.F.dtype)
        return ME.SparseTensor(out, coordinate_map_key=out_key, coordinate_manager=x.coordinate_manager)

    def extra_repr(self) -> str:
        return f"{self.mode}, kernel_size={self.kernel_size}, stride={self.stride}"
