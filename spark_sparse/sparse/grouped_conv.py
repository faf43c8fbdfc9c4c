"""Grouped sparse convolution (ResNeXt's 3x3) over mask-aligned visible blocks.

The same exact paths as patch_conv.py's ``PatchConvolution``: tiles for blocks of 4x4 sites and
more (one grouped oneDNN convolution over all tiles), below them offset GEMMs on the CPU (per
kernel offset, one batched matrix product per group over the present pairs only) and window
GEMMs elsewhere (every window gathered, one batched matrix product). Parameters keep timm's layout
(``weight`` (C_out, C_in / groups, k, k), ``bias``): MinkowskiEngine has no grouped kernel.
"""

from __future__ import annotations

import MinkowskiEngine as ME
import torch
from torch import Tensor, nn

from .amp import autocast_backward, autocast_forward
from .row_saving import save_rows, saved_rows
from .gemm_conv import WindowGemm, accumulate_rows, select_rows, small_block_path
from .depthwise import canvas_convolution
from .patch_conv import TileConv, standardised
from .patch_sites import OffsetPairs, PatchSites, tile_fits, tile_geometry


# Grouped convolutions run on tiles from 4x4 blocks, not 8x8 as dense ones: their offset GEMMs
# are per-group products too small to be efficient. Measured by benchmarks/conv_paths.py (CPU,
# forward+backward, mask 0.6) at 4x4 blocks: ResNeXt-50 (32 groups) batch 8 tiles 12.9 ms against
# offset GEMMs 33.9 ms, RegNetY-1.6GF (groups 24 wide) batch 16 11.3 ms against 22.5 ms; at 2x2
# blocks offset GEMMs stay ahead (6.7 against 10.3 ms, 11.4 against 13.9 ms).
GROUPED_TILE_MIN_SITES = 4


class GroupedOffsetGemm(torch.autograd.Function):
    """Per kernel offset: (n, G, C_in/G) rows times (G, C_in/G, C_out/G) weights, summed onto the
    present output rows."""

    @staticmethod
    @autocast_forward
    def forward(ctx, feats: Tensor, kernel: Tensor, pairs: list[OffsetPairs], n_out: int) -> Tensor:
        # kernel: (K, G, C_in/G, C_out/G)
        save_rows(ctx, feats, kernel)
        ctx.pairs = pairs
        g, c_in, c_out = kernel.shape[1:]
        out = None
        for k, o, i in pairs:
            y = torch.bmm(select_rows(feats, i).view(-1, g, c_in).transpose(0, 1), kernel[k])  # (G, n, c_out)
            out = accumulate_rows(out, o, y.transpose(0, 1).reshape(-1, g * c_out), n_out)
        return out.to(feats.dtype)

    @staticmethod
    @autocast_backward
    def backward(ctx, grad_out: Tensor):
        feats, kernel = saved_rows(ctx)
        g, c_in, c_out = kernel.shape[1:]
        grad_out = grad_out.contiguous()
        need_feats, need_kernel = ctx.needs_input_grad[:2]
        grad_feats = None
        grad_kernel = torch.zeros_like(kernel) if need_kernel else None
        for k, o, i in ctx.pairs:
            go = select_rows(grad_out, o).view(-1, g, c_out).transpose(0, 1)  # (G, n, c_out)
            if need_kernel:
                x = select_rows(feats, i).view(-1, g, c_in).transpose(0, 1)  # (G, n, c_in)
                grad_kernel[k] = torch.bmm(x.transpose(1, 2), go)
            if need_feats:
                gx = torch.bmm(go, kernel[k].transpose(1, 2)).transpose(0, 1).reshape(-1, g * c_in)
                grad_feats = accumulate_rows(grad_feats, i, gx, feats.shape[0])
        return None if grad_feats is None else grad_feats.to(feats.dtype), grad_kernel, None, None


class GroupedConvolution(nn.Module):
    """A grouped k x k (odd k, or an even one at stride 1) submanifold or strided convolution (any
    groups in dilated.py's subclass); ``padding``: as ``PatchConvolution``'s (None: centred;
    TensorFlow's 'same' at stride 2 starts one site later, an even kernel's at stride 1 at the site)."""

    tile_min_sites = GROUPED_TILE_MIN_SITES
    small_block_path: str | None = None  # "offsets" or "windows"; None: by device (gemm_conv.SMALL_BLOCK_PATHS)
    padding: int | None = None  # (a class default too: modules pickled before it existed)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int,
                 bias: bool = False, padding: int | None = None):
        super().__init__()
        self.stride, self.groups, self.padding = stride, groups, padding
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels // groups, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def weight_kernel(self) -> Tensor:
        """The (C_out, C_in / G, k, k) kernel the convolution runs with (subclasses derive it)."""
        return self.weight

    def path(self, sites_per_side: int, device: torch.device) -> str:
        """'tiles', 'offsets' or 'windows': as ``PatchConvolution.path``."""
        if sites_per_side >= self.tile_min_sites:
            return "tiles"
        return self.small_block_path or small_block_path(device)

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        sites = PatchSites.of(x)
        out = self.rows(x, sites)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)  # as torch's convolutions add theirs under autocast
        if self.stride == 1:
            return ME.SparseTensor(out, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)
        out_stride = x.tensor_stride[0] * self.stride
        return ME.SparseTensor(out, coordinate_map_key=sites.key(out_stride), coordinate_manager=sites.manager)

    def rows(self, x: ME.SparseTensor, sites: PatchSites) -> Tensor:
        """The output rows, without the bias."""
        kernel = self.weight_kernel()  # its size, not the parameter's: a dilated one is wider
        c_out, c_in_g, k, _ = kernel.shape
        in_stride, out_stride = x.tensor_stride[0], x.tensor_stride[0] * self.stride
        s = sites.sites_per_side(in_stride)
        if not tile_fits(s, *tile_geometry(s, k, self.stride, self.padding)):
            return self.canvas_rows(x, sites)
        g = self.groups
        path = self.path(s, x.F.device)
        if path == "tiles":
            tile = sites.tile(in_stride, *tile_geometry(s, k, self.stride, self.padding))
            out = TileConv.apply(x.F, kernel, tile, self.stride, self.groups)
        else:
            # (C_out, C_in/G, kh, kw) with MinkowskiEngine's offset order (first axis fastest) ...
            weight = kernel.view(g, c_out // g, c_in_g, k, k)
            if path == "windows":
                kernel = weight.permute(0, 4, 3, 2, 1).reshape(g, k * k * c_in_g, c_out // g)  # (G, K * C_in/G, C_out/G)
                out = WindowGemm.apply(x.F, kernel, sites.windows(in_stride, k, self.stride, self.padding))
            else:
                kernel = weight.permute(4, 3, 0, 2, 1).reshape(k * k, g, c_in_g, c_out // g)  # (K, G, C_in/G, C_out/G)
                out = GroupedOffsetGemm.apply(x.F, kernel, sites.pairs(in_stride, k, self.stride, self.padding),
                                              sites.num_rows(out_stride))
        return out

    def canvas_rows(self, x: ME.SparseTensor, sites: PatchSites) -> Tensor:
        """The output rows where the window reaches past a block's neighbours (FastViT's 7x7 at
        stride 2 over 2x2 blocks; SKNet's dilated 3x3 at stride 32), where no table goes: on the
        whole images' map at this stride (depthwise.canvas_convolution)."""
        return canvas_convolution(x.F, self.weight_kernel(), sites, x.tensor_stride[0], self.stride,
                                  top_left=self.padding, groups=self.groups)

    def extra_repr(self) -> str:
        c_out, c_in_g, k, _ = self.weight.shape
        padding = "" if self.padding is None else f", padding={self.padding}"
        return f"{c_in_g * self.groups}, {c_out}, kernel_size={k}, stride={self.stride}, groups={self.groups}{padding}"


class ScaledStdGroupedConvolution(GroupedConvolution):
    """timm's grouped ScaledStdConv2d (NFNet's 3x3): each output channel's kernel standardised,
    times ``gain`` (timm's parameter) and ``scale`` (a constant)."""

    def __init__(self, *args, eps: float = 1e-6, scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps, self.scale = eps, scale
        self.gain = nn.Parameter(torch.ones(self.weight.shape[0], 1, 1, 1))

    def weight_kernel(self) -> Tensor:
        w = self.weight.view(self.weight.shape[0], -1).t()  # a column per output channel
        return standardised(w, self.eps, (self.gain * self.scale).view(-1)).t().reshape_as(self.weight)
