"""Grouped and depthwise 1x1 convolutions, strided or not, over mask-aligned visible blocks
(RepVGG's grouped 1x1 branch, MobileOne's depthwise 1x1 "scale" branch), and a 1x1 convolution
with the batch norm after it that keeps no product for backward (RepVGG's 1x1 branch).

A 1x1 convolution has no neighbours: a strided one reads, for each site of the coarser grid,
the site of the finer grid at the same coordinates (the top-left one of its window), which the
patch-major rows give by slicing each block (no index table); then each group's channels go
through their own matrix (per channel: a scale, for a depthwise one). A tile or an offset table
would cost more, and tiles for a window smaller than its stride would not even cover the block.
"""

from __future__ import annotations

import MinkowskiEngine as ME
import torch
from torch import Tensor, nn

from ..precision import statistics_dtype
from .amp import autocast_backward, autocast_dtype, autocast_forward
from .norm_act import batch_norm_arguments
from .patch_conv import PatchConvolution
from .patch_sites import PatchSites
from .row_saving import save_rows, saved_rows


def strided_rows(feats: Tensor, sites_per_side: int, stride: int) -> Tensor:
    """The rows of the sites at multiples of ``stride`` in each block, patch-major, as the
    coarser grid orders them."""
    s, c = sites_per_side, feats.shape[1]
    return feats.view(-1, s, s, c)[:, ::stride, ::stride].reshape(-1, c)


def on_output_sites(x: ME.SparseTensor, out: Tensor, stride: int) -> ME.SparseTensor:
    """Output rows of a layer of ``stride`` on input ``x``: its sites, or the coarser grid's."""
    if stride == 1:
        return ME.SparseTensor(out, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)
    sites = PatchSites.of(x)
    return ME.SparseTensor(out, coordinate_map_key=sites.key(x.tensor_stride[0] * stride),
                           coordinate_manager=sites.manager)


class GroupedPointwise(nn.Module):
    """A 1x1 convolution with ``groups`` > 1 (depthwise where every group is one channel in and
    out) and any stride, with timm's parameters (``weight`` (C_out, C_in / G, 1, 1), ``bias``)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, stride: int = 1, bias: bool = False):
        super().__init__()
        self.stride, self.groups = stride, groups
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels // groups, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        s = PatchSites.of(x).sites_per_side(x.tensor_stride[0])
        feats = x.F if self.stride == 1 else strided_rows(x.F, s, self.stride)
        weight, bias = self.weight, self.bias
        c_out, c_in_g = weight.shape[:2]
        g = self.groups
        dtype = autocast_dtype(feats.device.type)
        if dtype is None or feats.dtype is torch.float64:
            dtype = feats.dtype
        # as a convolution under autocast: operands (bias too) in autocast's dtype, products summed
        # and the bias added in float32, the result rounded once to autocast's dtype
        feats, weight = feats.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        if c_in_g == 1 and c_out == g:  # depthwise: a scale per channel
            wide = statistics_dtype(dtype)
            out = feats.to(wide) * weight.view(1, c_out).to(wide)
            out = (out if bias is None else out + bias.to(wide)).to(dtype)
        else:  # (G, n, C_in/G) @ (G, C_in/G, C_out/G) [+ bias (G, 1, C_out/G)]
            rows = feats.view(-1, g, c_in_g).transpose(0, 1)
            weight = weight.view(g, c_out // g, c_in_g).transpose(1, 2)
            out = (torch.bmm(rows, weight) if bias is None else
                   torch.baddbmm(bias.view(g, 1, c_out // g), rows, weight))
            out = out.transpose(0, 1).reshape(-1, c_out)
        return on_output_sites(x, out, self.stride)

    def extra_repr(self) -> str:
        c_out, c_in_g = self.weight.shape[:2]
        return f"{c_in_g * self.groups}, {c_out}, kernel_size=1, stride={self.stride}, groups={self.groups}"


class PointwiseBatchNorm(torch.autograd.Function):
    """batch_norm(rows @ kernel), of the rows at multiples of ``stride`` in each block for a
    strided one, keeping for backward the input rows (which the block's other branches keep
    anyway, or ``save_rows`` makes again) but not their product: backward makes the product
    again, one GEMM, where keeping it would cost a row tensor per branch. Running statistics are
    updated once, in forward."""

    @staticmethod
    @autocast_forward(cast_inputs=False)  # the norm's parameters and statistics stay float32
    def forward(ctx, x: Tensor, kernel: Tensor, sites_per_side: int, stride: int, weight: Tensor | None,
                bias: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None, training: bool,
                momentum: float, eps: float) -> Tensor:
        rows = x if stride == 1 else strided_rows(x, sites_per_side, stride)
        y, mean, invstd = torch.native_batch_norm(rows @ kernel, weight, bias, running_mean, running_var,
                                                  training, momentum, eps)
        if not training:  # the statistics the product was normalised with
            mean, invstd = running_mean, (running_var + eps).rsqrt()
        save_rows(ctx, x, kernel, weight, running_mean, running_var, mean, invstd)
        ctx.sites_per_side, ctx.stride, ctx.training, ctx.eps = sites_per_side, stride, training, eps
        return y

    @staticmethod
    @autocast_backward
    def backward(ctx, grad: Tensor):
        x, kernel, weight, running_mean, running_var, mean, invstd = saved_rows(ctx)
        s, stride = ctx.sites_per_side, ctx.stride
        rows = x if stride == 1 else strided_rows(x, s, stride)
        need = ctx.needs_input_grad
        grad_product, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad, rows @ kernel, weight, running_mean, running_var, mean if ctx.training else None,
            invstd if ctx.training else None, ctx.training, ctx.eps,
            [need[0] or need[1], need[4] and weight is not None, need[5]])
        grad_kernel = rows.t() @ grad_product if need[1] else None
        grad_x = None
        if need[0]:
            grad_rows = grad_product @ kernel.t().to(grad_product.dtype)
            if stride == 1:
                grad_x = grad_rows
            else:  # onto the strided sites of each block, zero elsewhere
                grad_x = x.new_zeros(x.shape)
                c = x.shape[1]
                grad_x.view(-1, s, s, c)[:, ::stride, ::stride] = grad_rows.view(-1, s // stride, s // stride, c)
        return grad_x, grad_kernel, None, None, grad_w, grad_b, None, None, None, None, None


class PointwiseNorm(nn.Module):
    """A bias-free 1x1 convolution (``PatchConvolution``, any stride) and the batch norm after it
    without an activation (a ``MinkowskiBatchNorm``), run as ``PointwiseBatchNorm``. It holds
    the two modules under their own names: weights and their names are unchanged."""

    def __init__(self, conv: PatchConvolution, bn: ME.MinkowskiBatchNorm):
        super().__init__()
        if int(conv.kernel_generator.kernel_size[0]) != 1 or conv.bias is not None:
            raise ValueError("PointwiseNorm needs a bias-free 1x1 convolution")
        if not isinstance(getattr(bn, "act", nn.Identity()), nn.Identity):
            raise ValueError("PointwiseNorm needs a batch norm without an activation")
        self.conv, self.bn = conv, bn

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        if type(self.bn.bn) is not nn.BatchNorm1d:  # e.g. synchronised across processes: run as it is
            return self.bn(self.conv(x))
        stride = int(self.conv.kernel_generator.kernel_stride[0])
        feats, kernel = x.F, self.conv.kernel.view(self.conv.in_channels, self.conv.out_channels)
        dtype = autocast_dtype(feats.device.type)
        if dtype is not None:  # the product in autocast's dtype, the norm in float32
            feats, kernel = feats.to(dtype), kernel.to(dtype)
        out = PointwiseBatchNorm.apply(feats, kernel, PatchSites.of(x).sites_per_side(x.tensor_stride[0]), stride,
                                       *batch_norm_arguments(self.bn.bn))
        return on_output_sites(x, out, stride)
