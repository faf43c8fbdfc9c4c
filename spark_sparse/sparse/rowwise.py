"""Operators on each visible site's feature row, or on each image's rows: layer norm, linear,
activations, batch norm with its activation, per-image scales (squeeze-excitation gates), layer
scale, drop path, and ConvNeXt-V2's global response norm.

They read and return ``MinkowskiEngine.SparseTensor``s on the input's coordinates and keep
timm's parameter names and layouts, so weights map one-to-one. Per-image operators (drop path,
GRN) find each row's image in the batch's ``PatchSites``.
"""

from __future__ import annotations

import MinkowskiEngine as ME
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .patch_sites import PatchSites


def with_features(x: ME.SparseTensor, feats: Tensor) -> ME.SparseTensor:
    """New features on the same sites."""
    return ME.SparseTensor(feats, coordinate_map_key=x.coordinate_map_key,
                           coordinate_manager=x.coordinate_manager)


def image_of_rows(x: ME.SparseTensor) -> Tensor:
    return PatchSites.of(x).image_of_rows(x.tensor_stride[0])


# activations whose forward can run in place and whose backward has its own kernel: the
# forward and gradient of any other module go through autograd
_ACT_KERNELS = {
    nn.ReLU: (torch.relu_, lambda grad, y: torch.ops.aten.threshold_backward(grad, y, 0)),
    nn.SiLU: (lambda y: F.silu(y, inplace=True), torch.ops.aten.silu_backward),
    nn.Hardswish: (lambda y: F.hardswish(y, inplace=True), torch.ops.aten.hardswish_backward),
}


def _act_grad(act: nn.Module, y: Tensor, grad: Tensor) -> Tensor:
    kernels = _ACT_KERNELS.get(type(act))
    if kernels is not None:
        return kernels[1](grad, y)
    with torch.enable_grad():
        y = y.requires_grad_()
        return torch.autograd.grad(act(y), y, grad)[0]


class BatchNormAct(torch.autograd.Function):
    """Batch norm over the rows, then an elementwise activation, keeping only the norm's input
    for backward: the normalised rows the activation's gradient needs are recomputed (one
    multiply-add per element) rather than stored, one row-sized tensor less per layer (as
    in-place activated batch norm does). Running statistics are updated once, in forward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                running_var: Tensor | None, training: bool, momentum: float, eps: float, act: nn.Module) -> Tensor:
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, training,
                                                  momentum, eps)
        if not training:  # the statistics the rows were normalised with
            mean, invstd = running_mean, (running_var + eps).rsqrt()
        ctx.save_for_backward(x, weight, bias, running_mean, running_var, mean, invstd)
        ctx.training, ctx.eps, ctx.act = training, eps, act
        kernels = _ACT_KERNELS.get(type(act))
        return kernels[0](y) if kernels is not None else act(y)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, bias, running_mean, running_var, mean, invstd = ctx.saved_tensors
        scale = invstd if weight is None else invstd * weight
        shift = -mean * scale if bias is None else bias - mean * scale
        grad_y = _act_grad(ctx.act, torch.addcmul(shift, x, scale), grad)
        need = ctx.needs_input_grad
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, weight, running_mean, running_var,
            mean if ctx.training else None, invstd if ctx.training else None,
            ctx.training, ctx.eps, [need[0], need[1] and weight is not None, need[2] and bias is not None])
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def batch_norm_act(x: Tensor, bn: nn.modules.batchnorm._BatchNorm, act: nn.Module) -> Tensor:
    """``act(bn(x))`` for (N, C) rows, as torch's batch norm module would run it (running
    statistics, momentum or a cumulative average), through ``BatchNormAct``; ``act`` must not
    work in place."""
    factor = 0.0
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    training = bn.training or bn.running_mean is None
    keep = not bn.training or bn.track_running_stats
    return BatchNormAct.apply(x, bn.weight, bn.bias, bn.running_mean if keep else None,
                              bn.running_var if keep else None, training, factor, bn.eps, act)


class ImageScale(torch.autograd.Function):
    """rows * scale[image of row] (a squeeze-excitation gate), keeping the (B, C) scales rather
    than their (N, C) gathered copy for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, image: Tensor) -> Tensor:
        ctx.save_for_backward(x, scale, image)
        return x * scale.index_select(0, image)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, scale, image = ctx.saved_tensors
        grad_x = grad * scale.index_select(0, image) if ctx.needs_input_grad[0] else None
        grad_scale = scale.new_zeros(scale.shape).index_add_(0, image, grad * x) if ctx.needs_input_grad[1] else None
        return grad_x, grad_scale, None


class SparseLayerNorm(nn.LayerNorm):
    """Layer norm over the channels of each visible site (timm's LayerNorm and LayerNorm2d)."""

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        return with_features(x, super().forward(x.F))


class SparseLinear(nn.Linear):
    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        return with_features(x, super().forward(x.F))


class SparseActivation(nn.Module):
    """Any elementwise activation module (GELU, SiLU, ...) applied to the rows."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.act = act

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        return with_features(x, self.act(x.F))


class SparseLayerScale(nn.Module):
    def forward(self, x: ME.SparseTensor, gamma: Tensor) -> ME.SparseTensor:
        return with_features(x, x.F * gamma)


class SparseDropPath(nn.Module):
    """Stochastic depth per sample: each image's rows are kept (and rescaled) or dropped together."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        sites = PatchSites.of(x)
        scale = torch.bernoulli(torch.full((sites.batch,), keep, device=x.F.device)) / keep
        return with_features(x, x.F * scale.to(x.F.dtype)[image_of_rows(x), None])

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class SparseGlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN with each image's per-channel L2 norm over that image's visible sites
    only (ConvNeXt-V2's MinkowskiGRN takes it over the whole batch: their issue #86)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        feats, image = x.F, image_of_rows(x)
        squares = feats.new_zeros(PatchSites.of(x).batch, feats.shape[1]).index_add_(0, image, feats * feats)
        # clamped: the gradient of a zero norm is zero, as for torch.norm
        norms = squares.clamp_min(torch.finfo(feats.dtype).tiny).sqrt()
        scale = (norms / (norms.mean(dim=1, keepdim=True) + self.eps)).index_select(0, image)
        return with_features(x, feats + torch.addcmul(self.bias, self.weight, feats * scale))
