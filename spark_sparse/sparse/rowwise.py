"""Operators on each visible site's feature row, or on each image's rows: layer norm, linear,
activations, scalar affines, per-image scales (squeeze-excitation gates), layer scale, drop path, and
ConvNeXt-V2's global response norm. Batch norm with its activation is in norm_act.py.

They read and return ``MinkowskiEngine.SparseTensor``s on the input's coordinates and keep
timm's parameter names and layouts, so weights map one-to-one. Per-image operators (drop path,
GRN) find each row's image in the batch's ``PatchSites``.
"""

from __future__ import annotations

import MinkowskiEngine as ME
import torch
from torch import Tensor, nn

from ..precision import statistics_dtype
from .amp import autocast_backward, autocast_forward
from .row_saving import save_rows, saved_rows
from .patch_sites import PatchSites


def with_features(x: ME.SparseTensor, feats: Tensor) -> ME.SparseTensor:
    """New features on the same sites."""
    return ME.SparseTensor(feats, coordinate_map_key=x.coordinate_map_key,
                           coordinate_manager=x.coordinate_manager)


def same_sites(a: ME.SparseTensor, b: ME.SparseTensor, what: str) -> None:
    """Refuse, in one line, to ``what`` two tensors on different sites."""
    if a.coordinate_map_key != b.coordinate_map_key:
        raise ValueError(f"cannot {what} tensors on different sites "
                         f"({a.coordinate_map_key} and {b.coordinate_map_key})")


def image_of_rows(x: ME.SparseTensor) -> Tensor:
    return PatchSites.of(x).image_of_rows(x.tensor_stride[0])


class ImageScale(torch.autograd.Function):
    """rows * scale[image of row] (a squeeze-excitation gate), keeping the (B, C) scales rather
    than their (N, C) gathered copy for backward, and the rows as ``save_rows`` keeps them. In
    the promoted dtype of the two, as ``x * gate`` is; the scale's gradient sums in float32."""

    @staticmethod
    @autocast_forward(cast_inputs=False)  # a product: autocast leaves it to type promotion
    def forward(ctx, x: Tensor, scale: Tensor, image: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, scale.dtype)
        x, scale = x.to(dtype), scale.to(dtype)
        save_rows(ctx, x, scale, image)
        return x * scale.index_select(0, image)

    @staticmethod
    @autocast_backward
    def backward(ctx, grad: Tensor):
        x, scale, image = saved_rows(ctx)
        grad_x = grad * scale.index_select(0, image) if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            dtype = statistics_dtype(scale.dtype)
            grad_scale = scale.new_zeros(scale.shape, dtype=dtype).index_add_(0, image, (grad * x).to(dtype))
        return grad_x, grad_scale, None


class SparseLayerNorm(nn.LayerNorm):
    """Layer norm over the channels of each visible site (timm's LayerNorm and LayerNorm2d)."""

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        return with_features(x, super().forward(x.F))


class SparseLayerNormAct(SparseLayerNorm):
    """timm's LayerNormAct2d: the layer norm of each visible site's channels, then ``act`` (a
    sparse twin of its activation; no tensors, so timm's names are the norm's)."""

    def __init__(self, *args, act: nn.Module, **kwargs):
        super().__init__(*args, **kwargs)
        self.act = act

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        return self.act(super().forward(x))


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


class SparseScalarAffine(nn.Module):
    """``scale * x + bias`` with learned scalars (HGNetV2's LearnableAffineBlock, timm's names),
    in the rows' dtype."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        return with_features(x, torch.addcmul(self.bias, x.F, self.scale).to(x.F.dtype))


class SparseStarReLU(SparseScalarAffine):
    """MetaFormer's StarReLU, ``scale * relu(x) ** 2 + bias``: the scalar affine of relu(x) ** 2."""

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        return with_features(x, (self.scale * torch.relu(x.F) ** 2 + self.bias).to(x.F.dtype))


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
        # timm's draws and rescaling, in the features' dtype (a float32 1 / keep is 3e-8 off float64's)
        scale = x.F.new_empty(sites.batch).bernoulli_(keep).div_(keep)
        return with_features(x, x.F * scale[image_of_rows(x), None])

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class SparseGlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN with each image's per-channel L2 norm over that image's visible sites
    only (ConvNeXt-V2's MinkowskiGRN takes it over the whole batch: their issue #86). The norms
    are taken in float32 for 16-bit rows, and the response is float32, as timm's under autocast."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        feats, image = x.F, image_of_rows(x)
        wide = feats.to(statistics_dtype(feats.dtype))
        squares = wide.new_zeros(PatchSites.of(x).batch, feats.shape[1]).index_add_(0, image, wide * wide)
        # clamped: the gradient of a zero norm is zero, as for torch.norm
        norms = squares.clamp_min(torch.finfo(squares.dtype).tiny).sqrt()
        scale = (norms / (norms.mean(dim=1, keepdim=True) + self.eps)).index_select(0, image)
        return with_features(x, wide + torch.addcmul(self.bias, self.weight, wide * scale))
