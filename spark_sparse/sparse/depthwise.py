"""Depthwise sparse convolution (ConvNeXt's 7x7 token mixer) over mask-aligned visible blocks.

Each channel is convolved with its own k x k kernel over present neighbours only (absent ones
read as zero, exactly as a submanifold convolution ignores them). Two layouts, chosen by block
size (see ``DepthwiseConvolution``):

* tiles: each visible block with a halo of its neighbours, a valid convolution (patch_conv.py's
  tile tables); the output rows need no scatter. For large blocks (8x8 sites and more).
* canvas: the rows scattered into a zeroed map of the whole image at this stride, a padded
  convolution, the visible rows gathered back. For small blocks, where a tile would be mostly
  halo (a 2x2 block in a 7x7 neighbourhood is a 8x8 tile: 16 times its rows).

On the CPU, forward and input gradient run as *forward* depthwise convolutions ("adjoint"): the
input gradient is the convolution with the flipped kernel. So does the weight gradient of kernels
from 5x5 on: per image and channel, the input convolved with its output gradient as a (large)
kernel, twice as fast as oneDNN's weight gradient there; a 3x3's is oneDNN's, 5-8 times faster
than that (the image-sized kernels' transposes cost more than its arithmetic). Elsewhere backward is
torch's own ("native": one call for both gradients, cuDNN's depthwise kernels on a GPU, where
a convolution with an image-sized kernel per image and channel has no fast kernel);
``BACKWARDS`` says which per device type. Backward regathers tiles or canvas from the saved
input rows rather than keeping them.
"""

from __future__ import annotations

import MinkowskiEngine as ME
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .amp import autocast_backward, autocast_forward
from .row_saving import save_rows, saved_rows
from .patch_conv import TileConv, from_canvas, gather_tiles, scatter_tiles, tile_rows, to_canvas
from .patch_sites import TILE_MIN_SITES, PatchSites, Tile, tile_fits, tile_geometry


def dw_forward(x: Tensor, weight: Tensor, padding: int, bias: Tensor | None = None) -> Tensor:
    return F.conv2d(x, weight, bias, padding=padding, groups=weight.shape[0])


def dw_grad_input(grad: Tensor, weight: Tensor, padding: int) -> Tensor:
    """The adjoint of a stride-1 depthwise convolution: the flipped kernel, opposite padding."""
    k = weight.shape[-1]
    return F.conv2d(grad, weight.flip(-1, -2), padding=k - 1 - padding, groups=weight.shape[0])


def dw_grad_weight(x: Tensor, grad: Tensor, padding: int) -> Tensor:
    """sum over images of x (padded) correlated with the output gradient, per channel: one
    depthwise convolution with an image's gradient as the kernel, then a sum over images."""
    n, c, h, w = grad.shape
    if padding:
        x = F.pad(x, (padding,) * 4)
    hp, wp = x.shape[-2:]
    out = F.conv2d(x.reshape(1, n * c, hp, wp), grad.reshape(n * c, 1, h, w), groups=n * c)
    k = hp - h + 1
    return out.view(n, c, k, k).sum(0).unsqueeze(1)


# how a stride-1 depthwise convolution's backward runs, per device type (others: "native")
BACKWARDS = {"cpu": "adjoint"}
# the adjoint's smallest kernel for the weight gradient: smaller ones take oneDNN's (measured on 2
# cores, torch 2.11: 3x3 over 256-1280 channels 5-8x faster; 5x5 and 7x7 2x slower)
ADJOINT_WEIGHT_MIN_KERNEL = 5


def backward_path(device: torch.device) -> str:
    return BACKWARDS.get(device.type, "native")


def _grads(ctx, x: Tensor, weight: Tensor, grad: Tensor, padding: int):
    """(input, weight, bias) gradients of a stride-1 depthwise convolution (the bias's: the output
    gradient summed per channel; it is zero off the visible sites)."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if ctx.backward == "native":  # one call for all three (on a GPU, one launch)
        return torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]], [1, 1], [padding, padding], [1, 1], False, [0, 0],
            weight.shape[0], [need_x, need_w, need_b])
    grad_b = grad.sum((0, 2, 3)) if need_b else None
    grad_x = dw_grad_input(grad, weight, padding) if need_x else None
    if need_w and weight.shape[-1] < ADJOINT_WEIGHT_MIN_KERNEL:
        _, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, [1, 1], [padding, padding], [1, 1], False, [0, 0], weight.shape[0],
            [False, True, False])
    else:
        grad_w = dw_grad_weight(x, grad, padding) if need_w else None
    return grad_x, grad_w, grad_b


class TileDepthwise(torch.autograd.Function):
    @staticmethod
    @autocast_forward
    def forward(ctx, feats: Tensor, weight: Tensor, bias: Tensor | None, tile: Tile, backward: str) -> Tensor:
        save_rows(ctx, feats, weight)
        ctx.tile, ctx.backward = tile, backward
        return tile_rows(dw_forward(gather_tiles(feats, tile), weight, 0, bias))

    @staticmethod
    @autocast_backward
    def backward(ctx, grad_rows: Tensor):
        feats, weight = saved_rows(ctx)
        tile = ctx.tile
        s = tile.sites
        # contiguous: a sum's gradient arrives expanded (all strides 0), which oneDNN takes as
        # a kernel 10 times slower
        grad = grad_rows.contiguous().view(-1, s, s, grad_rows.shape[1]).permute(0, 3, 1, 2)
        grad_tiles, grad_w, grad_b = _grads(ctx, gather_tiles(feats, tile), weight, grad, 0)
        return (None if grad_tiles is None else scatter_tiles(grad_tiles, tile)), grad_w, grad_b, None, None


def canvas_convolution(feats: Tensor, weight: Tensor, sites: PatchSites, in_stride: int, stride: int = 1,
                       top_left: int | None = None, dilation: int = 1, groups: int = 1) -> Tensor:
    """The rows convolved on the whole images' zeroed map at ``in_stride`` by torch (autograd
    through scatter, convolution and gather), the output's visible rows gathered: for windows that
    reach past a block's neighbours, where no tile or offset table goes. ``top_left``: the
    padding above and left (None: centred); below and right, what keeps every output site."""
    k = (weight.shape[-1] - 1) * dilation + 1
    top_left = k // 2 if top_left is None else top_left
    canvas = to_canvas(feats, sites.canvas_index(in_stride), sites.canvas_shape(in_stride))
    out = F.conv2d(F.pad(canvas, (top_left, k - 1 - top_left) * 2), weight, stride=stride, dilation=dilation,
                   groups=groups)
    return from_canvas(out, sites.canvas_index(in_stride * stride))


class CanvasDepthwise(torch.autograd.Function):
    @staticmethod
    @autocast_forward
    def forward(ctx, feats: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor, shape: tuple[int, int, int],
                backward: str) -> Tensor:
        save_rows(ctx, feats, weight, index)
        ctx.shape, ctx.backward = shape, backward
        padding = weight.shape[-1] // 2
        return from_canvas(dw_forward(to_canvas(feats, index, shape), weight, padding, bias), index)

    @staticmethod
    @autocast_backward
    def backward(ctx, grad_rows: Tensor):
        feats, weight, index = saved_rows(ctx)
        padding = weight.shape[-1] // 2
        grad = to_canvas(grad_rows.contiguous(), index, ctx.shape)
        grad_x, grad_w, grad_b = _grads(ctx, to_canvas(feats, index, ctx.shape), weight, grad, padding)
        return (None if grad_x is None else from_canvas(grad_x, index)), grad_w, grad_b, None, None, None


class DepthwiseConvolution(nn.Module):
    """A depthwise k x k (odd k) submanifold convolution, or a strided one that keeps the visible
    sites of the coarser grid, on mask-aligned sparse tensors, with timm's parameters (``weight``
    (C, 1, k, k), ``bias`` (C,)). Strided ones (a few per EfficientNet) run on tiles, with
    oneDNN's own backward, or where the window reaches past the neighbours on the canvas;
    ``padding`` (strided ones only) as for patch_sites.py ``tile_geometry``."""

    tile_min_sites = TILE_MIN_SITES
    padding: int | None = None  # (a class default too: modules pickled before it existed)
    backward_path: str | None = None  # stride 1: "adjoint" or "native"; None: by device (``BACKWARDS``)

    def __init__(self, channels: int, kernel_size: int, bias: bool = True, stride: int = 1,
                 padding: int | None = None):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"depthwise kernel size must be odd, got {kernel_size}")
        if stride == 1 and padding not in (None, kernel_size // 2):
            raise ValueError(f"a stride-1 depthwise convolution keeps its sites: padding {padding} "
                             f"would move a {kernel_size}x{kernel_size} window off-centre")
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.zeros(channels, 1, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    @property
    def kernel_size(self) -> int:
        return self.weight.shape[-1]

    def kernel(self) -> Tensor:
        """The (C, 1, k, k) kernel the convolution runs with."""
        return self.weight

    def kernel_bias(self) -> Tensor | None:
        """The (C,) bias the convolution adds, if any."""
        return self.bias

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        sites = PatchSites.of(x)
        stride = x.tensor_stride[0]
        s = sites.sites_per_side(stride)
        weight, bias = self.kernel(), self.kernel_bias()
        start, size = tile_geometry(s, self.kernel_size, self.stride, self.padding)
        if self.stride == 1:  # the convolution adds the bias, its backward takes its gradient: two kernels fewer
            backward = self.backward_path or backward_path(x.F.device)
            if s >= self.tile_min_sites:
                out = TileDepthwise.apply(x.F, weight, bias, sites.tile(stride, start, size), backward)
            else:
                out = CanvasDepthwise.apply(x.F, weight, bias, sites.canvas_index(stride), sites.canvas_shape(stride),
                                            backward)
            return ME.SparseTensor(out, coordinate_map_key=x.coordinate_map_key,
                                   coordinate_manager=x.coordinate_manager)
        if not tile_fits(s, start, size):  # MixNet's 7x7, 9x9 over 2x2 blocks
            out = canvas_convolution(x.F, weight, sites, stride, self.stride, -start, groups=weight.shape[0])
        else:
            out = TileConv.apply(x.F, weight, sites.tile(stride, start, size), self.stride, weight.shape[0])
        if bias is not None:
            out = out + bias.to(out.dtype)  # as torch's convolutions add theirs under autocast
        return ME.SparseTensor(out, coordinate_map_key=sites.key(stride * self.stride),
                               coordinate_manager=sites.manager)

    def extra_repr(self) -> str:
        padding = "" if self.padding is None else f", padding={self.padding}"
        return (f"{self.weight.shape[0]}, kernel_size={self.kernel_size}, stride={self.stride}{padding}, "
                f"bias={self.bias is not None}")


class BandDepthwiseConvolution(DepthwiseConvolution):
    """A depthwise 1 x k or k x 1 submanifold convolution (odd k, centred: InceptionNeXt's band
    kernels) with timm's ``weight`` (C, 1, 1, k) or (C, 1, k, 1): it runs as the k x k depthwise
    convolution whose kernel is zero off its middle row or column, which is the same convolution
    (k times the band's arithmetic, on the few channels a band branch has)."""

    def __init__(self, channels: int, kernel_size: tuple[int, int], bias: bool = True):
        super().__init__(channels, max(kernel_size), bias)
        if min(kernel_size) != 1:
            raise ValueError(f"a band kernel is 1 x k or k x 1, got {kernel_size}")
        self.weight = nn.Parameter(torch.zeros(channels, 1, *kernel_size))

    @property
    def kernel_size(self) -> int:
        return max(self.weight.shape[-2:])

    def kernel(self) -> Tensor:
        kh, kw = self.weight.shape[-2:]
        side, top = max(kh - kw, 0) // 2, max(kw - kh, 0) // 2  # zero columns left/right, rows above/below
        return F.pad(self.weight, (side, side, top, top))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, kernel_size={tuple(self.weight.shape[-2:])}, bias={self.bias is not None}"


class SharedKernelsDepthwise(DepthwiseConvolution):
    """Each of ``kernels`` k x k kernels over each of the input's C channels (timm's lambda layer's
    position convolution: an ``nn.Conv3d`` of one input channel and kernel (k, k, 1)): (N, C) ->
    (N, kernels * C), kernel after kernel; ``weight`` (kernels, 1, k, k, 1) and ``bias`` (kernels,)
    are timm's. A depthwise convolution of the input repeated ``kernels`` times."""

    def __init__(self, kernels: int, channels: int, kernel_size: int):
        super().__init__(kernels * channels, kernel_size)
        self.channels = channels
        self.weight = nn.Parameter(torch.zeros(kernels, 1, kernel_size, kernel_size, 1))
        self.bias = nn.Parameter(torch.zeros(kernels))

    @property
    def kernel_size(self) -> int:
        return self.weight.shape[2]

    def kernel(self) -> Tensor:
        return self.weight[..., 0].repeat_interleave(self.channels, 0)

    def kernel_bias(self) -> Tensor:
        return self.bias.repeat_interleave(self.channels)

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        tiled = ME.SparseTensor(x.F.repeat(1, self.weight.shape[0]), coordinate_map_key=x.coordinate_map_key,
                                coordinate_manager=x.coordinate_manager)
        return super().forward(tiled)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]} x {self.channels}, kernel_size={self.kernel_size}"


class HeadSharedDepthwise(DepthwiseConvolution):
    """One depthwise k x k kernel of ``channels`` channels run on each of ``heads`` groups of them
    (MViTv2's pooling of q, k and v, at stride 1, 2 or 4): ``weight`` (channels, 1, k, k) is
    timm's; a depthwise convolution of heads * channels channels with that kernel repeated."""

    def __init__(self, heads: int, channels: int, kernel_size: int, stride: int = 1):
        super().__init__(heads * channels, kernel_size, bias=False, stride=stride)
        self.heads = heads
        self.weight = nn.Parameter(torch.zeros(channels, 1, kernel_size, kernel_size))

    def kernel(self) -> Tensor:
        return self.weight.repeat(self.heads, 1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.heads} x {self.weight.shape[0]}, kernel_size={self.kernel_size}, stride={self.stride}"
