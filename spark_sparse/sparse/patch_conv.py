"""Fast sparse convolution and pooling for SparK's patch-structured sparsity, on ME tensors.

At stride s the visible sites form whole S x S blocks (patch_sites.py). Three exact ways to run a
sparse convolution over them, chosen per layer by measurement:

* tiles (here): each block with a halo of its neighbours (absent ones read as zero, exactly as a
  sparse convolution ignores them) is a small dense tile; one batched oneDNN convolution over
  all tiles computes every visible output site and nothing else. Rows are patch-major, so the
  output needs no scatter. Wins where blocks are large (S >= 4).
* offset GEMMs and window GEMMs (gemm_conv.py) over blocks smaller than a tile's: offset GEMMs
  on the CPU (measured faster there: they skip absent neighbours), window GEMMs elsewhere (a
  few operations queued per convolution instead of several per kernel offset), as
  ``gemm_conv.SMALL_BLOCK_PATHS`` says.

All keep only their input rows for backward, not the tiles (and not even the rows where a batch
norm with its activation made them: row_saving.py), and tensors in and out stay
``MinkowskiEngine.SparseTensor``s. Under autocast they compute, and keep their rows, in autocast's
dtype, as torch's convolutions do (amp.py); offset GEMMs sum their offsets in float32.
"""

from __future__ import annotations

import MinkowskiEngine as ME
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..precision import statistics_dtype
from .amp import autocast_backward, autocast_forward
from .gemm_conv import OffsetGemm, Pointwise, WindowGemm, small_block_path
from .row_saving import save_rows, saved_rows
from .patch_sites import TILE_MIN_SITES, PatchSites, Tile, tile_geometry


def gather_tiles(feats: Tensor, tile: Tile, fill: float = 0.0) -> Tensor:
    """Every patch's tile as a (P, C, size, size) batch (channels-last in memory)."""
    rows = feats.index_select(0, tile.present_rows).masked_fill_(tile.absent, fill)
    return rows.view(-1, tile.size, tile.size, feats.shape[1]).permute(0, 3, 1, 2)


def scatter_tiles(grad: Tensor, tile: Tile) -> Tensor:
    """The adjoint of ``gather_tiles``: tile gradients summed back onto rows. A patch's own part
    of its tile is its rows in order (a copy); the halo is scattered, its absent positions'
    gradients zeroed first (they add to row 0: a fixed shape, whichever neighbours are present)."""
    c, a, s = grad.shape[1], -tile.start, tile.sites
    g = grad.permute(0, 2, 3, 1)
    rows = g[:, a:a + s, a:a + s].reshape(-1, c)
    halo = g.reshape(-1, c).index_select(0, tile.halo_positions).masked_fill_(tile.halo_absent, 0)
    return rows.index_add_(0, tile.halo_rows, halo)


def tile_rows(out: Tensor) -> Tensor:
    """(P, C, s, s) tile outputs -> (P * s * s, C) patch-major rows (a view when channels-last)."""
    return out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])


class TileConv(torch.autograd.Function):
    """A valid convolution over every patch's tile; backward gathers the tiles again rather than
    keeping them (a tile is up to 2.25 times its patch's rows)."""

    @staticmethod
    @autocast_forward
    def forward(ctx, feats: Tensor, weight: Tensor, tile: Tile, stride: int, groups: int = 1) -> Tensor:
        save_rows(ctx, feats, weight)
        ctx.tile, ctx.stride, ctx.groups = tile, stride, groups
        return tile_rows(F.conv2d(gather_tiles(feats, tile), weight, stride=stride, groups=groups))

    @staticmethod
    @autocast_backward
    def backward(ctx, grad_rows: Tensor):
        feats, weight = saved_rows(ctx)
        tile, stride = ctx.tile, ctx.stride
        s_out = tile.sites // stride
        grad_out = grad_rows.reshape(-1, s_out, s_out, grad_rows.shape[1]).permute(0, 3, 1, 2)
        need_feats, need_weight = ctx.needs_input_grad[:2]
        grad_tiles, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad_out, gather_tiles(feats, tile), weight, None, [stride, stride], [0, 0], [1, 1],
            False, [0, 0], ctx.groups, [need_feats, need_weight, False])
        grad_feats = scatter_tiles(grad_tiles, tile) if need_feats else None
        return grad_feats, grad_weight, None, None, None


class TileMaxPool(torch.autograd.Function):
    """Max pooling over present sites, absent ones reading ``fill`` (-inf: they never win); keeps
    where in its tile each maximum was (int16), not the tiles."""

    @staticmethod
    @autocast_forward(cast_inputs=False)  # pooling keeps its input's dtype
    def forward(ctx, feats: Tensor, tile: Tile, kernel_size: int, stride: int, fill: float = float("-inf")) -> Tensor:
        if tile.size**2 > torch.iinfo(torch.int16).max:
            raise ValueError(f"a {tile.size}x{tile.size} pooling tile is too large for int16 positions")
        tiles = gather_tiles(feats, tile, fill)
        out, where = F.max_pool2d(tiles, kernel_size, stride, return_indices=True)
        p, c = out.shape[:2]
        ctx.save_for_backward(where.permute(0, 2, 3, 1).reshape(p, -1, c).to(torch.int16))
        ctx.tile, ctx.num_rows = tile, feats.shape[0]
        return tile_rows(out)

    @staticmethod
    @autocast_backward
    def backward(ctx, grad_rows: Tensor):
        (where,) = ctx.saved_tensors
        tile = ctx.tile
        p, c = where.shape[0], where.shape[2]
        first = torch.arange(0, tile.rows.shape[0], tile.size**2, device=where.device)  # of each tile
        where = where.long() + first.view(p, 1, 1)
        source = tile.rows.long()[where.view(-1, c)]  # the row each maximum came from
        # one row more: where an absent site's fill won (its row number is num_rows), the gradient goes nowhere
        grad = grad_rows.new_zeros(ctx.num_rows + 1, c)
        return grad.scatter_add_(0, source, grad_rows.contiguous())[:-1], None, None, None, None


class TileAvgPool(torch.autograd.Function):
    """Average pooling over every patch's tile, absent sites reading zero and counted (the
    divisor is always k * k, as torch's with ``count_include_pad``); keeps nothing for backward
    (the pooling is linear: its adjoint needs only the tile's shape)."""

    @staticmethod
    @autocast_forward(cast_inputs=False)  # pooling keeps its input's dtype
    def forward(ctx, feats: Tensor, tile: Tile, kernel_size: int, stride: int) -> Tensor:
        tiles = gather_tiles(feats, tile)
        ctx.tile, ctx.kernel_size, ctx.stride, ctx.shape = tile, kernel_size, stride, tiles.shape
        return tile_rows(F.avg_pool2d(tiles, kernel_size, stride))

    @staticmethod
    @autocast_backward
    def backward(ctx, grad_rows: Tensor):
        tile, k, stride = ctx.tile, ctx.kernel_size, ctx.stride
        s_out = tile.sites // stride
        grad_out = grad_rows.reshape(-1, s_out, s_out, grad_rows.shape[1]).permute(0, 3, 1, 2)
        tiles = grad_out.new_empty(ctx.shape)  # uninitialised: only its shape is read
        grad_tiles = torch.ops.aten.avg_pool2d_backward(grad_out, tiles, [k, k], [stride, stride], [0, 0],
                                                        False, True, None)
        return scatter_tiles(grad_tiles, tile), None, None, None


class PatchConvolution(ME.MinkowskiConvolution):
    """Drop-in for MinkowskiConvolution (same parameters and state dict) on mask-aligned tensors;
    ``padding``: the zero padding above and left of the map (patch_sites.py ``tile_geometry``),
    None for a centred kernel as MinkowskiEngine's.

    Convolutions over blocks of at least ``tile_min_sites`` sites per side run on tiles, the
    others (deeper stages, where a tile would be mostly halo and absent neighbours many) as
    offset GEMMs on the CPU: measured faster each way (benchmarks/conv_paths.py; 4x4 blocks are
    close, and offset GEMMs the faster by about 10% for ResNet-50 and at mask 0.75); on other
    devices as window GEMMs (``small_block_path``: one of them for every device). 1x1
    convolutions are a matrix product of the (for stride 2: selected) rows.
    """

    tile_min_sites = TILE_MIN_SITES
    small_block_path: str | None = None  # "offsets" or "windows"; None: by device (gemm_conv.SMALL_BLOCK_PATHS)
    padding: int | None = None  # (a class default too: modules pickled before it existed)

    def __init__(self, *args, padding: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.padding = padding

    # MinkowskiEngine keeps its convolution's settings in __slots__, which nn.Module's pickling
    # (its __dict__) leaves out: copies and unpickled modules would have no kernel generator.
    # They travel as constructor arguments and are rebuilt (ME's own forward, unused here, is not).
    def __getstate__(self) -> dict:
        state = super().__getstate__()
        kernel = self.kernel_generator
        state["_me_settings"] = dict(in_channels=self.in_channels, out_channels=self.out_channels,
                                     kernel_size=int(kernel.kernel_size[0]), stride=int(kernel.kernel_stride[0]),
                                     dimension=self.dimension)
        return state

    def __setstate__(self, state: dict) -> None:
        settings = state.pop("_me_settings")
        super().__setstate__(state)
        kernel = ME.KernelGenerator(kernel_size=settings["kernel_size"], stride=settings["stride"],
                                    dilation=1, dimension=settings["dimension"])
        self.in_channels, self.out_channels = settings["in_channels"], settings["out_channels"]
        self.is_transpose, self.dimension, self.kernel_generator = False, settings["dimension"], kernel
        self.use_mm = kernel.kernel_volume == 1 and kernel.requires_strided_coordinates
        if "bias" not in self._parameters:
            self.bias = None

    def weight_kernel(self) -> Tensor:
        """The kernel the convolution runs with (ME's layout)."""
        return self.kernel

    def path(self, sites_per_side: int, device: torch.device) -> str:
        """How the convolution runs over blocks of ``sites_per_side`` with features on ``device``:
        'pointwise', 'tiles', 'offsets' or 'windows'."""
        kh, stride = int(self.kernel_generator.kernel_size[0]), int(self.kernel_generator.kernel_stride[0])
        if kh == 1:  # no neighbours: the rows (for a stride: the selected ones) times the kernel
            return "pointwise" if stride == 1 else "offsets"
        if sites_per_side >= self.tile_min_sites:
            return "tiles"
        return self.small_block_path or small_block_path(device)

    def forward(self, x: ME.SparseTensor, coordinates=None) -> ME.SparseTensor:
        kh = int(self.kernel_generator.kernel_size[0])
        stride = int(self.kernel_generator.kernel_stride[0])
        param = self.weight_kernel()
        kernel = param.view(-1, self.in_channels, self.out_channels)
        sites = PatchSites.of(x)
        in_stride, out_stride = x.tensor_stride[0], x.tensor_stride[0] * stride
        path = self.path(sites.sites_per_side(in_stride), x.F.device)
        if path == "pointwise":  # a view of the kernel: its gradient needs no copy
            out = Pointwise.apply(x.F, param.view(self.in_channels, self.out_channels))
        elif path == "offsets":
            pairs = sites.pairs(in_stride, kh, stride, self.padding)
            out = OffsetGemm.apply(x.F, kernel, pairs, sites.num_rows(out_stride))
        elif path == "windows":
            windows = sites.windows(in_stride, kh, stride, self.padding)
            out = WindowGemm.apply(x.F, kernel.view(1, -1, self.out_channels), windows)
        else:
            s = sites.sites_per_side(in_stride)
            # ME's (K, C_in, C_out), first spatial axis fastest -> (C_out, C_in, kh, kw)
            weight = kernel.reshape(kh, kh, self.in_channels, self.out_channels).permute(3, 2, 1, 0)
            tile = sites.tile(in_stride, *tile_geometry(s, kh, stride, self.padding))
            out = TileConv.apply(x.F, weight, tile, stride)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)  # as torch's convolutions add theirs under autocast
        if stride == 1:
            key, manager = x.coordinate_map_key, x.coordinate_manager
        else:
            key, manager = sites.key(out_stride), sites.manager
        return ME.SparseTensor(out, coordinate_map_key=key, coordinate_manager=manager)


class StdPatchConvolution(PatchConvolution):
    """timm's StdConv2d: each output channel's kernel standardised (zero mean, unit variance over
    its C_in x k x k weights, ``eps`` added to the variance) at every forward, as timm does with
    a batch norm over the weight; the sparse convolution runs with the standardised kernel."""

    def __init__(self, *args, eps: float = 1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def channel_gain(self) -> Tensor | None:
        """Each output channel's factor after standardising (none here)."""
        return None

    def weight_kernel(self) -> Tensor:
        # a column per output channel, any kernel layout
        w = self.kernel.view(-1, self.out_channels)
        return standardised(w, self.eps, self.channel_gain()).view_as(self.kernel)


def standardised(w: Tensor, eps: float, gain: Tensor | None = None, fused: bool | None = None) -> Tensor:
    """Each column of ``w`` (an output channel's weights) to zero mean and unit variance, ``eps``
    added to the variance, times ``gain`` (per column), as timm's weight standardisation does
    with a batch norm. ``fused`` (None: off the CPU): that batch norm, one kernel each way on a
    GPU (the plain reductions launch a dozen); on the CPU two passes of plain reductions, 2-3.5
    times faster than torch's batch norm or var_mean there for a ResNet-50's weights."""
    if fused if fused is not None else w.device.type != "cpu":
        return F.batch_norm(w, None, None, weight=gain, training=True, momentum=0.0, eps=eps)
    centred = w - w.mean(0)
    out = centred * torch.rsqrt((centred * centred).mean(0) + eps)
    return out if gain is None else out * gain


class ScaledStdPatchConvolution(StdPatchConvolution):
    """timm's ScaledStdConv2d (NFNet): the standardised kernel times ``gain`` (a parameter per
    output channel, timm's name and shape) and ``scale`` (a constant)."""

    def __init__(self, *args, scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = scale
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))

    def channel_gain(self) -> Tensor:
        return (self.gain * self.scale).view(-1)


def to_canvas(rows: Tensor, index: Tensor, shape: tuple[int, int, int], fill: float = 0.0) -> Tensor:
    """Rows -> a (B, C, h, w) map (channels-last in memory) holding them at ``index`` and ``fill``
    elsewhere (zeros for a convolution, -inf for a max pooling)."""
    b, h, w = shape
    canvas = rows.new_full((b * h * w, rows.shape[1]), fill).index_copy_(0, index, rows)
    return canvas.view(b, h, w, -1).permute(0, 3, 1, 2)


def from_canvas(canvas: Tensor, index: Tensor) -> Tensor:
    return canvas.permute(0, 2, 3, 1).reshape(-1, canvas.shape[1]).index_select(0, index)


def canvas_max_pool(feats: Tensor, index: Tensor, shape: tuple[int, int, int], kernel_size: int) -> Tensor:
    """A centred odd k x k stride-1 max pooling over the present sites (CSPNeXt's spatial pyramid
    pooling: 5, 9, 13 at stride 32, far wider than a patch's halo): the rows scattered into the
    whole images' map at -inf, pooled there by torch, gathered back (autograd through all three)."""
    canvas = to_canvas(feats, index, shape, fill=float("-inf"))
    return from_canvas(F.max_pool2d(canvas, kernel_size, 1, kernel_size // 2), index)


class PatchPooling(nn.Module):
    """Max (3x3, stride 2, over present sites; 2x2, stride 1 or 2; any odd k x k at stride 1, on the
    canvas) or average (2x2, stride 2; 3x3, stride 1 or 2, absent sites counted as zeros, or with
    ``present_only`` the mean of the window's present sites: torch's ``count_include_pad=False``
    where nothing is hidden, and MinkowskiEngine's average pooling) pooling.
    ``fill``: what an absent site reads in an overlapping max pooling (-inf: nothing; 0: as a zero
    padding would). Non-overlapping windows
    lie inside one patch (the mask is aligned to the coarsest grid): a patch's rows are its
    channels-last map, pooled by torch, with no index table. ``padding``: as ``tile_geometry``'s
    (None: a centred window; 0 for an unpadded 3x3 stride-2 max pooling with ``ceil_mode``, as
    VoVNet's, which on the even maps it reads is TensorFlow's 'same')."""

    fill: float = float("-inf")  # (a class default too: modules pickled before it existed)

    padding: int | None = None  # (a class default too: modules pickled before it existed)
    present_only: bool = False  # (a class default too: modules pickled before it existed)

    def __init__(self, mode: str, kernel_size: int, stride: int, relu: bool = False, fill: float = float("-inf"),
                 padding: int | None = None, present_only: bool = False):
        super().__init__()
        if mode not in ("max", "avg"):
            raise ValueError(f"pooling mode must be 'max' or 'avg', got '{mode}'")
        self.mode, self.kernel_size, self.stride = mode, kernel_size, stride
        self.relu = relu  # a ReLU after pooling (for max pooling the same as one before it)
        self.fill = fill
        self.padding = padding
        self.present_only = present_only

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        sites = PatchSites.of(x)
        s, k = sites.sites_per_side(x.tensor_stride[0]), self.kernel_size
        if self.mode == "max" and self.stride == 1 and k % 2 and self.fill == float("-inf"):
            stride = x.tensor_stride[0]
            out = canvas_max_pool(x.F, sites.canvas_index(stride), sites.canvas_shape(stride), k)
        elif k == self.stride or (k == 1 and not self.padding):
            # windows inside one patch (EfficientFormerV2's 1x1 at stride 2 takes each 2x2 block's first
            # site): each patch a channels-last (C, s, s) map, torch's own pooling (and ties)
            pool = F.max_pool2d if self.mode == "max" else F.avg_pool2d
            maps = x.F.view(-1, s, s, x.F.shape[1]).permute(0, 3, 1, 2)
            out = pool(maps, k, self.stride).permute(0, 2, 3, 1).reshape(-1, x.F.shape[1])
        else:
            tile = sites.tile(x.tensor_stride[0], *tile_geometry(s, k, self.stride, self.padding))
            if self.mode == "max":
                out = TileMaxPool.apply(x.F, tile, k, self.stride, self.fill)
            else:
                out = TileAvgPool.apply(x.F, tile, k, self.stride)
                if self.present_only:  # the share of the window present, from the tables alone
                    ones = x.F.new_ones(x.F.shape[0], 1, dtype=statistics_dtype(x.F.dtype))
                    present = TileAvgPool.apply(ones, tile, k, self.stride)
                    out = (out / present).to(out.dtype)
        if self.relu:
            out = F.relu(out)
        key = sites.key(x.tensor_stride[0] * self.stride)
        return ME.SparseTensor(out, coordinate_map_key=key, coordinate_manager=sites.manager)

    def extra_repr(self) -> str:
        relu = ", then ReLU" if self.relu else ""
        overlapping = self.kernel_size != self.stride
        fill = f", absent sites read {self.fill}" if overlapping and self.fill != float("-inf") else ""
        fill = ", absent sites read 0 (counted)" if overlapping and self.mode == "avg" else fill
        fill = ", over the present sites" if overlapping and self.present_only else fill
        padding = "" if self.padding is None else f", padding={self.padding}"
        return f"{self.mode}, kernel_size={self.kernel_size}, stride={self.stride}{padding}{fill}{relu}"


class PatchifyConvolution(nn.Module):
    """A k x k, stride-k convolution (ConvNeXt's 4x4 stem and 2x2 downsampling), with timm's
    ``weight`` (C_out, C_in, k, k) and ``bias``. Its windows never overlap and, the mask being
    aligned to the coarsest grid, lie inside one visible block: the patch-major rows regroup
    into windows by a reshape, and the convolution is one matrix product, with no index table."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        sites = PatchSites.of(x)
        k, stride = self.kernel_size, x.tensor_stride[0]
        s, c_in = sites.sites_per_side(stride), x.F.shape[1]
        if s % k:
            raise ValueError(f"a {k}x{k} stride-{k} convolution does not tile {s}x{s} blocks")
        windows = (x.F.view(-1, s // k, k, s // k, k, c_in).permute(0, 1, 3, 2, 4, 5)
                   .reshape(-1, k * k * c_in))  # (window row, window column, channel) order
        weight = self.weight.permute(2, 3, 1, 0).reshape(k * k * c_in, -1)
        out = windows @ weight if self.bias is None else torch.addmm(self.bias, windows, weight)
        key = sites.key(stride * k)
        return ME.SparseTensor(out, coordinate_map_key=key, coordinate_manager=sites.manager)

    def extra_repr(self) -> str:
        c_out, c_in, k, _ = self.weight.shape
        return f"{c_in}, {c_out}, kernel_size={k}, stride={k}, bias={self.bias is not None}"
