"""The dense-masked reference encoder: SparK's official way of *simulating* sparsity.

Every layer runs densely over the whole image and its output is multiplied by the mask;
batch and layer norms gather the visible sites first. Layers that keep zeros at zero (ReLU,
GELU, drop-path, a bias-free linear) skip the multiply, and a ConvNeXt MLP, like the official
code's, runs over every site and is masked once, where the block adds its input: a tensor marks
itself ``dirty`` when hidden sites may hold values, and what needs zeros there cleans it first.
It is the baseline of the equivalence tests and of every benchmark. The mask travels with the
tensor (``MaskedTensor``), never in global state.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from timm.layers import (BatchNormAct2d, BlurPool2d, CondConv2d, DropPath, EvoNorm2dS0, EvoNorm2dS0a,
                         FilterResponseNormTlu2d, GlobalContext, GroupNormAct, LayerNormAct2d, SpaceToDepth)
from timm.layers.grn import GlobalResponseNorm
from timm.models.edgenext import PositionalEncodingFourier
from timm.models.hgnet import LearnableAffineBlock
from timm.models.metaformer import StarReLU
from timm.models.swiftformer import EfficientAdditiveAttention
from torch import Tensor, nn

from ..mask import check_patch_grid, upsample_active
from ..precision import statistics_dtype
from ..timm_models import copy_parameters
from ..transfer import to_device
from .attention import (ATTENTION, AbsolutePositions, ChannelGroupAttention, CrossCovarianceAttention, GridAttention,
                        GroupedQueryAttention, LinearAttention, MaskUnitAttention, PackedQkvAttention,
                        RelativeLogitsAttention, SELF_ATTENTION, SeparableGridAttention, WindowAttention)
from .base import Encoder
from .families.byoanet import HaloAttention
from .families.coat import FactorAttention
from .families.cond_conv import CondConvExperts
from .families.dfc import DfcGate
from .families.efficientformer_v2 import OffsetBiasAttention
from .families.gcvit import TiledTokens
from .families.lambdas import LambdaMixing, PositionLambdas
from .families.mvitv2 import HeadLayerNorm, HeadSharedConv2d, PoolingAttention
from .leaves import (ACTIVATIONS, CONVOLUTIONS, DROPOUTS, GROUP_NORMS, LAYER_NORMS, RMS_NORMS, ZERO_MOVING,
                     ChannelConcat, ChannelSplit, ColumnsFirstSpaceToDepth, GatedImageVector, ImageFactor, ImageMean,
                     LayerScale, Product, RadixSum, SiteRmsNorm, ZeroPaddedMaxPool, adaptive_pool_size, check_max_pool,
                     check_norm_act, pool_geometry, transposed_geometry, upsample_scale)
from .masked_attention import (MaskedAbsolutePositions, MaskedAdditiveAttention, MaskedChannelAttention,
                               MaskedChannelGroupAttention, MaskedCrossCovarianceAttention, MaskedFourierPositions,
                               MaskedGlobalContext, MaskedGridAttention, MaskedGroupedQueryAttention,
                               MaskedFactorAttention, MaskedHaloAttention, MaskedLambdaMixing, MaskedLinearAttention,
                               MaskedMaskUnitAttention,
                               MaskedOffsetBiasAttention, MaskedPackedQkvAttention, MaskedPoolingAttention,
                               MaskedRelativeLogitsAttention, MaskedSelfAttention, MaskedSeparableGridAttention,
                               MaskedWindowAttention, visible_means)
from .masked_tensor import MaskedTensor, on_visible_rows
from .refusals import unsupported
from .sync_norm import SyncVisibleBatchNorm, twin_of


class MaskedConv2d(nn.Conv2d):
    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        y = super().forward(inp.clean().x)
        return MaskedTensor(y * upsample_active(inp.active, y.shape[-2:]), inp.active)


class MaskedBatchNorm2d(nn.BatchNorm2d):
    """Batch statistics over visible sites only, as SparK's SparseBatchNorm2d."""

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        return on_visible_rows(inp, self._rows)

    def _rows(self, rows: Tensor) -> Tensor:
        # BatchNorm2d over a (1, C, N, 1) view is BatchNorm1d over the N visible rows
        n, c = rows.shape
        return super().forward(rows.t().reshape(1, c, n, 1)).reshape(c, n).t()

    def synchronised(self) -> SyncMaskedBatchNorm2d:
        """Its twin whose statistics span every process (torchrun)."""
        return twin_of(self, SyncMaskedBatchNorm2d)


class MaskedBatchNormAct2d(MaskedBatchNorm2d):
    """timm's BatchNormAct2d: the batch norm above, then its activation, on the visible rows."""

    def __init__(self, num_features: int, *args, act: nn.Module, **kwargs):
        super().__init__(num_features, *args, **kwargs)
        self.act = copy.deepcopy(act)

    @classmethod
    def from_timm(cls, bn: BatchNormAct2d) -> MaskedBatchNormAct2d:
        return twin_of(bn, cls, act=bn.act)

    def _rows(self, rows: Tensor) -> Tensor:
        return self.act(super()._rows(rows))

    def synchronised(self) -> SyncMaskedBatchNormAct2d:
        return twin_of(self, SyncMaskedBatchNormAct2d, act=self.act)


# Synchronised twins: the masked norms gather the visible sites and call ``super().forward``,
# which these class orders resolve to SyncVisibleBatchNorm's.
class SyncMaskedBatchNorm2d(MaskedBatchNorm2d, SyncVisibleBatchNorm):
    pass


class SyncMaskedBatchNormAct2d(MaskedBatchNormAct2d, SyncVisibleBatchNorm):
    pass


class MaskedGroupNormAct(nn.Module):
    """timm's GroupNormAct (its ``weight`` and ``bias``) with each image's statistics per group
    over its visible sites only (hidden sites hold zeros and are not counted), then its
    activation; hidden sites are zeroed by whatever reads the map next. As the sparse engine's
    (and torch's group norm on a CPU under autocast): statistics and output computed in float32
    for 16-bit maps, returned in the map's dtype."""

    def __init__(self, norm: nn.GroupNorm, act: nn.Module):
        super().__init__()
        self.num_groups, self.eps = norm.num_groups, norm.eps
        self.weight = None if norm.weight is None else nn.Parameter(norm.weight.detach().clone())
        self.bias = None if norm.bias is None else nn.Parameter(norm.bias.detach().clone())
        self.act = copy.deepcopy(act)

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        x = inp.clean().x
        dtype = statistics_dtype(x.dtype)
        visible = inp.visible().to(dtype)
        b, c, h, w = x.shape
        g = self.num_groups
        xg = x.to(dtype).view(b, g, c // g, h, w)
        count = visible.sum((1, 2, 3)).clamp_min(1) * (c // g)  # (B,) visible values per group
        mean = xg.sum((2, 3, 4)) / count[:, None]
        centred = (xg - mean[:, :, None, None, None]) * visible[:, None]  # hidden: still zero
        var = centred.square().sum((2, 3, 4)) / count[:, None]
        y = (centred * torch.rsqrt(var + self.eps)[:, :, None, None, None]).view(b, c, h, w)
        if self.weight is not None:
            y = y * self.weight.view(1, -1, 1, 1)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return MaskedTensor(self.act(y).to(x.dtype), inp.active, dirty=True)


class MaskedEvoNorm(nn.Module):
    """timm's EvoNorm2dS0 / S0a with each image's group deviation over its visible positions
    (hidden ones hold zeros and are not counted); the bias reaches hidden positions (masked later)."""

    def __init__(self, norm: EvoNorm2dS0):
        super().__init__()
        self.groups, self.eps = norm.groups, norm.eps
        self.divide_always = isinstance(norm, EvoNorm2dS0a)
        copy_parameters(norm, self, optional=("v",))

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        x = inp.clean().x
        b, c, h, w = x.shape
        if self.v is not None or self.divide_always:
            visible, dtype = inp.visible(), statistics_dtype(x.dtype)
            xg = x.to(dtype).view(b, self.groups, c // self.groups, h, w)
            count = visible.sum((1, 2, 3)).clamp_min(1).to(dtype) * (c // self.groups)  # (B,)
            mean = xg.sum((2, 3, 4)) / count[:, None]
            centred = (xg - mean[:, :, None, None, None]) * visible[:, None]
            std = (centred.square().sum((2, 3, 4)) / count[:, None] + self.eps).sqrt().to(x.dtype)
            if self.v is not None:
                x = x * torch.sigmoid(x * self.v.view(1, -1, 1, 1).to(x.dtype))
            x = x / std.repeat_interleave(c // self.groups, 1)[:, :, None, None]
        y = x * self.weight.view(1, -1, 1, 1).to(x.dtype) + self.bias.view(1, -1, 1, 1).to(x.dtype)
        return MaskedTensor(y, inp.active, dirty=True)


class MaskedFilterResponseNorm(nn.Module):
    """timm's FilterResponseNormTlu2d with each image's channel RMS over its visible positions."""

    def __init__(self, norm: FilterResponseNormTlu2d):
        super().__init__()
        self.eps = norm.eps
        copy_parameters(norm, self, optional=("tau",))

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        x = inp.clean().x
        dtype = statistics_dtype(x.dtype)
        count = inp.visible().sum((2, 3)).clamp_min(1).to(dtype)  # (B, 1)
        inv_rms = torch.rsqrt(x.to(dtype).square().sum((2, 3)) / count + self.eps).to(x.dtype)
        y = x * inv_rms[:, :, None, None] * self.weight.view(1, -1, 1, 1).to(x.dtype)
        y = y + self.bias.view(1, -1, 1, 1).to(x.dtype)
        if self.tau is not None:
            y = torch.maximum(y, self.tau.view(1, -1, 1, 1).to(y.dtype))
        return MaskedTensor(y, inp.active, dirty=True)


class MaskedLayerNorm(nn.LayerNorm):
    """Layer norm of each visible site's channels; hidden sites stay zero (SparK's
    SparseConvNeXtLayerNorm). One module for timm's channels-last and channels-first norms."""

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        return on_visible_rows(inp, super().forward)


class MaskedLayerNormAct(MaskedLayerNorm):
    """timm's LayerNormAct2d: the layer norm of each visible site's channels, then ``act`` (its
    activation, which keeps zeros at zero)."""

    def __init__(self, *args, act: nn.Module, **kwargs):
        super().__init__(*args, **kwargs)
        self.act = act

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        return self.act(super().forward(inp))


class MaskedLinear(nn.Linear):
    """A linear layer over every site's channels; with a bias, hidden sites get values."""

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        y = super().forward(inp.x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return inp._replace(x=y, dirty=inp.dirty or self.bias is not None)


class MaskedGlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN with each image's statistics over its visible sites: the hidden sites
    are zeroed first, so they add nothing to the per-channel norms (taken in float32 for 16-bit
    maps; the response is float32, as timm's under autocast)."""

    def __init__(self, grn: GlobalResponseNorm):
        super().__init__()
        self.eps = grn.eps
        self.weight = nn.Parameter(grn.weight.detach().clone())
        self.bias = nn.Parameter(grn.bias.detach().clone())

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        x = inp.clean().x
        x_g = torch.linalg.vector_norm(x, 2, dim=(2, 3), keepdim=True, dtype=statistics_dtype(x.dtype))
        x_n = x_g / (x_g.mean(dim=1, keepdim=True) + self.eps)
        y = x + torch.addcmul(self.bias.view(1, -1, 1, 1), self.weight.view(1, -1, 1, 1), x * x_n)
        return MaskedTensor(y, inp.active, dirty=True)


class MaskedLayerScale(nn.Module):
    def forward(self, inp: MaskedTensor, gamma: Tensor) -> MaskedTensor:
        return inp._replace(x=inp.x * gamma.view(1, -1, 1, 1))


class MaskedCondConv(CondConvExperts):
    """CondConv on the masked map: timm's own forward (each image's mixed kernel); hidden sites
    get values (masked later)."""

    def forward(self, inp: MaskedTensor, routing: Tensor) -> MaskedTensor:
        return MaskedTensor(CondConv2d.forward(self, inp.clean().x, routing), inp.active, dirty=True)


class MaskedMaxPool(nn.Module):
    """Max pooling over the visible sites only: hidden ones go in as -inf and come out as zeros.
    After a ReLU (``after_relu``) the zeros they hold never win, so the fill is skipped, as in
    SparK's code; after an activation that can be negative (SiLU, say) they would."""

    def __init__(self, pool: nn.MaxPool2d, after_relu: bool = False):
        super().__init__()
        self.pool = copy.deepcopy(pool)
        self.after_relu = after_relu

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        x = inp.clean().x
        if not self.after_relu:
            x = x.masked_fill(~inp.visible(), float("-inf"))
        y = self.pool(x)  # -inf where a window holds no visible site: replaced, not multiplied
        return MaskedTensor(y.masked_fill(~upsample_active(inp.active, y.shape[-2:]), 0.0), inp.active)


class MaskedDfcGate(DfcGate):
    """GhostNetV2's gate made on the input's map (zeros where hidden): the output times it."""

    def forward(self, x: MaskedTensor, out: MaskedTensor) -> MaskedTensor:
        canvas = x.clean().x
        return MaskedTensor(out.x * self.gate(canvas, x.visible().to(canvas.dtype)), out.active, out.dirty)


class MaskedChannelSplit(ChannelSplit):
    def forward(self, inp: MaskedTensor) -> tuple[MaskedTensor, MaskedTensor]:
        return tuple(inp._replace(x=x) for x in super().forward(inp.x))


class MaskedChannelConcat(ChannelConcat):
    def forward(self, *tensors: MaskedTensor) -> MaskedTensor:
        return MaskedTensor(super().forward(*(t.x for t in tensors)), tensors[0].active,
                            any(t.dirty for t in tensors))


class MaskedTiledTokens(TiledTokens):
    """The tokens' clean map repeated over the finer one (hidden sites get values, masked later)."""

    def forward(self, tokens: MaskedTensor, like: MaskedTensor) -> MaskedTensor:
        return MaskedTensor(super().forward(tokens.clean().x, like.x), like.active, dirty=True)


class MaskedProduct(Product):
    def forward(self, a: MaskedTensor, b: MaskedTensor) -> MaskedTensor:
        # zero at a hidden site if either factor is
        return MaskedTensor(super().forward(a.x, b.x), a.active, a.dirty and b.dirty)


class MaskedApply(nn.Module):
    """Run a dense module on the masked map, then zero the hidden sites again (pooling and
    convolutions spread into them): timm's own module, so its padding (TensorFlow 'same' in
    Conv2dSame) and weight standardisation (StdConv2d) are timm's."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        y = self.module(inp.clean().x)
        return MaskedTensor(y * upsample_active(inp.active, y.shape[-2:]), inp.active)


class MaskedHeadLayerNorm(HeadLayerNorm):
    """MViTv2's per-head layer norm of every site's channels, the hidden sites zeroed again (``rows``:
    a class token's)."""

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        y = super().forward(inp.clean().x)
        return MaskedTensor(y * upsample_active(inp.active, y.shape[-2:]), inp.active)


class MaskedGridPool(nn.Module):
    """timm's adaptive average pooling of the masked map, one cell per patch (a hidden patch's cell
    zero), on a grid of patches of the pooling's size alone (``mask.check_patch_grid``)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        check_patch_grid(self.size, inp.active.shape[-2:])
        return MaskedTensor(F.adaptive_avg_pool2d(inp.clean().x, self.size), inp.active)


class MaskedPaddedAvgPool(MaskedApply):
    """A padded average pooling on a contiguous map: the masked norms hand on channels-last maps,
    and torch's CUDA backward of a padded average pooling over channels-last input leaves out the
    padding offset, silently wrong gradients (pytorch/pytorch#188344, fixed after torch 2.11)."""

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        return super().forward(inp._replace(x=inp.x.contiguous()))


class MaskedPointwise(nn.Module):
    """An elementwise module (ReLU, GELU, drop-path) that keeps zeros at zero: no re-masking; one
    that moves zero (``moves_zero``: a sigmoid) gives hidden sites values, masked later."""

    def __init__(self, module: nn.Module, moves_zero: bool = False):
        super().__init__()
        self.module, self.moves_zero = module, moves_zero

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        return inp._replace(x=self.module(inp.x), dirty=inp.dirty or self.moves_zero)


# the twins that run timm's module itself as their ``module``
WRAPPERS = (MaskedApply, MaskedPointwise)


class MaskedImageMean(ImageMean):
    """Each image's mean over its visible positions."""

    def forward(self, inp: MaskedTensor) -> Tensor:
        return visible_means(inp)


class MaskedGatedImageVector(GatedImageVector):
    def forward(self, gate: MaskedTensor, vector: Tensor) -> MaskedTensor:
        return gate._replace(x=super().forward(gate.x, vector))  # zero where the gate is


class MaskedImageFactor(ImageFactor):
    def forward(self, inp: MaskedTensor, factors: Tensor) -> MaskedTensor:
        return inp._replace(x=super().forward(inp.x, factors))  # zero stays zero


class MaskedRadixSum(RadixSum):
    def forward(self, inp: MaskedTensor, weights: Tensor) -> MaskedTensor:
        return inp._replace(x=super().forward(inp.x, weights))  # zero stays zero


class MaskedScalarAffine(nn.Module):
    """``scale * x + bias`` with learned scalars (HGNetV2's LearnableAffineBlock, timm's names), in
    the map's dtype: hidden sites get the bias, so whatever reads the map next masks it."""

    def __init__(self, module: LearnableAffineBlock):
        super().__init__()
        self.scale = nn.Parameter(module.scale.detach().clone())
        self.bias = nn.Parameter(module.bias.detach().clone())

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        x = torch.addcmul(self.bias, inp.x, self.scale).to(inp.x.dtype)
        return MaskedTensor(x, inp.active, dirty=True)


class MaskedStarReLU(MaskedScalarAffine):
    """MetaFormer's StarReLU, ``scale * relu(x) ** 2 + bias``: the scalar affine of relu(x) ** 2
    (hidden sites get the bias, so whatever reads the map next masks it)."""

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        x = (self.scale * torch.relu(inp.x) ** 2 + self.bias).to(inp.x.dtype)
        return MaskedTensor(x, inp.active, dirty=True)


class MaskedVisibleAvgPool(MaskedPaddedAvgPool):
    """An average pooling that leaves its padding uncounted (``count_include_pad=False``) as the
    mean of each window's visible sites: the masked map's window sums over its share of visible
    sites, both pooled with the padding counted. Where nothing is hidden, torch's own; hidden sites
    count as the padding does (not at all), so an image's border averages as it would beside
    hidden patches (canvas invariance)."""

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        pool = self.module
        x, visible = inp.clean().x.contiguous(), inp.visible().to(inp.x.dtype)
        k, s, p = pool_geometry(pool)
        share = F.avg_pool2d(visible, k, s, p).clamp_min(1 / k**2)  # a window with none visible sums to 0
        y = F.avg_pool2d(x, k, s, p) / share
        return MaskedTensor(y * upsample_active(inp.active, y.shape[-2:]), inp.active)


POINTWISE = (nn.ReLU, DropPath) + ACTIVATIONS + DROPOUTS


def _masked_layer_norm(norm: nn.LayerNorm, act: nn.Module | None = None) -> MaskedLayerNorm:
    """A layer norm's twin (with its activation's twin, LayerNormAct2d's, where given), timm's tensors loaded."""
    args = (norm.normalized_shape, norm.eps, norm.elementwise_affine)
    bias = norm.bias is not None
    twin = MaskedLayerNorm(*args, bias=bias) if act is None else MaskedLayerNormAct(*args, bias=bias, act=act)
    twin.load_state_dict(norm.state_dict())
    return twin


class MaskedRmsNorm(SiteRmsNorm):
    """An RMS norm of each visible site's channels; hidden sites stay zero."""

    def forward(self, inp: MaskedTensor) -> MaskedTensor:
        return on_visible_rows(inp, self.rows)


def convert_leaf(module: nn.Module, path: str) -> nn.Module:
    if type(module) is nn.Conv2d:
        conv = MaskedConv2d(module.in_channels, module.out_channels, module.kernel_size,
                            module.stride, module.padding, module.dilation, module.groups,
                            module.bias is not None)
        conv.load_state_dict(module.state_dict())
        return conv
    if type(module) in CONVOLUTIONS:  # timm's 'same'-padded and weight-standardised ones
        return MaskedApply(copy.deepcopy(module))
    if type(module) is nn.BatchNorm2d:
        bn = MaskedBatchNorm2d(module.num_features, module.eps, module.momentum,
                               module.affine, module.track_running_stats)
        bn.load_state_dict(module.state_dict())
        return bn
    if type(module) is BatchNormAct2d:
        check_norm_act(module, path)
        return MaskedBatchNormAct2d.from_timm(module)
    if type(module) is GroupNormAct:
        check_norm_act(module, path)
        return MaskedGroupNormAct(module, module.act)
    if type(module) in GROUP_NORMS:
        return MaskedGroupNormAct(module, nn.Identity())
    # timm's own (and Swin's space to depth), hidden sites reading zero
    if type(module) in (ZeroPaddedMaxPool, BlurPool2d, SpaceToDepth, ColumnsFirstSpaceToDepth, PositionLambdas,
                        HeadSharedConv2d):
        return MaskedApply(copy.deepcopy(module))
    if type(module) is HeadLayerNorm:
        return MaskedHeadLayerNorm(module, module.heads)
    if type(module) in LAYER_NORMS:
        return _masked_layer_norm(module)
    if type(module) in RMS_NORMS:
        return MaskedRmsNorm(module, path)
    if type(module) is LayerNormAct2d:
        check_norm_act(module, path)
        return _masked_layer_norm(module, convert_leaf(module.act, f"{path}.act"))
    if type(module) is nn.Linear:
        linear = MaskedLinear(module.in_features, module.out_features, module.bias is not None)
        linear.load_state_dict(module.state_dict())
        return linear
    if type(module) is GlobalResponseNorm:
        if module.channel_dim not in (-1, 1):
            raise unsupported(module, path, f"channel dim {module.channel_dim}")
        return MaskedGlobalResponseNorm(module)
    if type(module) is LayerScale:
        return MaskedLayerScale()
    if type(module) is LearnableAffineBlock:
        return MaskedScalarAffine(module)
    if type(module) is StarReLU:
        return MaskedStarReLU(module)
    if type(module) in ATTENTION:
        return MaskedChannelAttention(module, path)
    if type(module) is GlobalContext:
        return MaskedGlobalContext(module, path)
    if type(module) is LinearAttention:
        return MaskedLinearAttention(module.dim, module.eps)
    if type(module) is EfficientAdditiveAttention:
        return MaskedAdditiveAttention(module, path)
    if type(module) is CrossCovarianceAttention:
        return MaskedCrossCovarianceAttention(module.num_heads)
    if type(module) is RelativeLogitsAttention:
        return module.like(MaskedRelativeLogitsAttention)
    if type(module) is HaloAttention:
        return module.like(MaskedHaloAttention)
    if type(module) is MaskUnitAttention:
        return module.like(MaskedMaskUnitAttention)
    if type(module) is AbsolutePositions:
        return MaskedAbsolutePositions()
    if type(module) is LambdaMixing:
        return module.like(MaskedLambdaMixing)
    if type(module) is ChannelGroupAttention:
        return MaskedChannelGroupAttention(module.num_heads, module.head_dim, module.v2, module.dynamic_scale)
    if type(module) is PositionalEncodingFourier:
        return MaskedFourierPositions(module, path)
    if type(module) in SELF_ATTENTION:
        return MaskedSelfAttention(module, path)
    if type(module) is PackedQkvAttention:
        return MaskedPackedQkvAttention(module.num_heads, module.key_dim)
    if type(module) is PoolingAttention:
        return module.like(MaskedPoolingAttention)
    if type(module) is FactorAttention:
        return MaskedFactorAttention(module.num_heads, module.scale)
    if type(module) is OffsetBiasAttention:
        return module.like(MaskedOffsetBiasAttention)
    if type(module) is GroupedQueryAttention:
        return MaskedGroupedQueryAttention(module.num_heads, module.key_dim, module.value_dim,
                                            module.kv_heads)
    if type(module) is WindowAttention:
        return module.like(MaskedWindowAttention)
    if type(module) is GridAttention:
        return module.like(MaskedGridAttention)
    if type(module) is SeparableGridAttention:
        return MaskedSeparableGridAttention(module.dim, module.grid)
    if type(module) is CondConv2d:
        return MaskedCondConv(module)
    if type(module) is DfcGate:
        return MaskedDfcGate(module)
    if type(module) in (EvoNorm2dS0, EvoNorm2dS0a):
        return MaskedEvoNorm(module)
    if type(module) is FilterResponseNormTlu2d:
        return MaskedFilterResponseNorm(module)
    if type(module) in POINTWISE:
        return MaskedPointwise(copy.deepcopy(module))
    if type(module) in ZERO_MOVING:
        return MaskedPointwise(copy.deepcopy(module), moves_zero=True)
    if isinstance(module, nn.MaxPool2d):
        check_max_pool(module, path)
        return MaskedMaxPool(module)
    if isinstance(module, nn.AvgPool2d):
        k, s, p = pool_geometry(module)
        # avg-down: mask-aligned windows, all visible or all hidden; a 3x3 (Res2Net, ResNeSt) counts
        # hidden zeros as it counts the padding's, a fixed depthwise convolution of the masked map
        centred_3x3 = (k, p) == (3, 1) and s in (1, 2) and not module.ceil_mode
        if centred_3x3 and not module.count_include_pad:  # PoolFormer's: the mean of the visible sites
            return MaskedVisibleAvgPool(module)
        if (k, s, p) not in ((2, 2, 0), (1, 2, 0)) and not (centred_3x3 and module.count_include_pad):
            raise unsupported(module, path, f"kernel {k}, stride {s}, padding {p}, count_include_pad "
                                            f"{module.count_include_pad}, ceil_mode {module.ceil_mode}")
        return MaskedApply(module) if p == 0 else MaskedPaddedAvgPool(module)
    if type(module) is nn.Upsample:
        upsample_scale(module, path)  # the same refusals as the sparse engine's
        return MaskedApply(copy.deepcopy(module))
    if type(module) is nn.AdaptiveAvgPool2d:
        return MaskedGridPool(adaptive_pool_size(module, path))
    if type(module) is nn.ConvTranspose2d:
        transposed_geometry(module, path)
        return MaskedApply(copy.deepcopy(module))
    if type(module) is ChannelSplit:
        return MaskedChannelSplit(module.first)
    if type(module) is ChannelConcat:
        return MaskedChannelConcat()
    if type(module) is Product:
        return MaskedProduct()
    if type(module) is TiledTokens:
        return MaskedTiledTokens(module.window)
    if type(module) is ImageMean:
        return MaskedImageMean()
    if type(module) is GatedImageVector:
        return MaskedGatedImageVector()
    if type(module) is RadixSum:
        return MaskedRadixSum(module.radix)
    if type(module) is ImageFactor:
        return MaskedImageFactor()
    if type(module) is nn.Identity:
        return nn.Identity()
    raise unsupported(module, path)


class MaskedDenseEncoder(Encoder):
    """Dense convolutions multiplied by the mask; same interface as ``SparseEncoder``."""

    convert_leaf = staticmethod(convert_leaf)

    def __init__(self, body: nn.ModuleDict, *args, **kwargs):
        super().__init__(body, *args, **kwargs)
        stem = self.family.stem_pool
        if stem:
            pool, act = body[stem.pool], body[stem.act]
            if isinstance(pool, MaskedMaxPool) and isinstance(act, MaskedPointwise) and type(act.module) is nn.ReLU:
                pool.after_relu = True  # as SparK's code: no -inf fill over the stem's map

    def encode_input(self, images: Tensor, active: Tensor, layout: None = None) -> MaskedTensor:
        active = to_device(active, images.device)
        return MaskedTensor(images * upsample_active(active, images.shape[-2:]), active)

    def to_dense(self, feature: MaskedTensor, batch: int, size: tuple[int, int]) -> Tensor:
        return feature.clean().x

    def timm_key(self, key: str) -> str:
        # the wrappers of timm's own modules (a 'same'-padded convolution's weight) add a ".module" to
        # their paths; a timm child named "module" (iFormer's Residual) keeps its name
        names = key.split(".")
        kept = [name for i, name in enumerate(names)
                if not (name == "module" and isinstance(self.get_submodule(".".join(names[:i])), WRAPPERS))]
        return super().timm_key(".".join(kept))
