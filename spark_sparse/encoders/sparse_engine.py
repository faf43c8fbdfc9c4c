"""Step 3: the sparse encoder — a timm convnet rebuilt from sparse modules on MinkowskiEngine tensors.

Stride-1 convolutions are submanifold (they keep their input sites), strided ones keep exactly
the visible sites of the coarser grid because the mask is aligned to the coarsest grid; norms
see visible sites only. Nothing is ever computed at a hidden site. ``convert_leaf`` is the one
place where a timm leaf module becomes its sparse twin, for every family.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from timm.layers import (BatchNormAct2d, BlurPool2d, CondConv2d, Conv2dSame, DropPath, EvoNorm2dS0, EvoNorm2dS0a,
                         FilterResponseNormTlu2d, GlobalContext, GroupNormAct, LayerNormAct2d, ScaledStdConv2d,
                         ScaledStdConv2dSame, SpaceToDepth, StdConv2d, StdConv2dSame, to_2tuple)
from timm.layers.grn import GlobalResponseNorm
from timm.models.edgenext import PositionalEncodingFourier
from timm.models.hgnet import LearnableAffineBlock
from timm.models.metaformer import StarReLU
from timm.models.swiftformer import EfficientAdditiveAttention
from torch import Tensor, nn

from ..sparse import ME  # the engine package: MinkowskiEngine, its CPU_ONLY note silenced
from ..sparse.amp import autocast_dtype
from ..sparse.blur_pool import PatchBlurPool
from ..sparse.depthwise import (BandDepthwiseConvolution, DepthwiseConvolution, HeadSharedDepthwise,
                                SharedKernelsDepthwise)
from ..sparse.dilated import DilatedConvolution
from ..sparse.gemm_conv import with_zero_row
from ..sparse.grid_pool import PatchGridPool
from ..sparse.group_norm import SparseGroupNormAct
from ..sparse.grouped_conv import GroupedConvolution, ScaledStdGroupedConvolution
from ..sparse.image_norms import SparseEvoNorm, SparseFilterResponseNorm
from ..sparse.norm_act import batch_norm_act
from ..sparse.patch_conv import (PatchConvolution, PatchifyConvolution, PatchPooling, ScaledStdPatchConvolution,
                                 StdPatchConvolution)
from ..sparse.patch_sites import PatchSites
from ..sparse.pointwise import GroupedPointwise, PointwiseNorm
from ..sparse.rowwise import (SparseActivation, SparseDropPath, SparseGlobalResponseNorm, SparseLayerNorm,
                              SparseLayerNormAct, SparseLayerScale, SparseLinear, SparseScalarAffine, SparseStarReLU,
                              image_of_rows, same_sites, with_features)
from ..sparse.space_to_depth import PatchSpaceToDepth
from ..sparse.sparsify import SparseLayout, copy_layout_, plan_layout, sparsify, to_dense
from ..sparse.transposed_conv import TransposedConvolution
from ..sparse.upsample import PatchUpsample
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
                     LayerScale, Product, RadixSum, SiteRmsNorm, ZeroPaddedConv2d, ZeroPaddedMaxPool,
                     adaptive_pool_size, check_max_pool, check_norm_act, pool_geometry, transposed_geometry,
                     upsample_scale)
from .refusals import unsupported
from .sparse_attention import (SparseAbsolutePositions, SparseAdditiveAttention, SparseChannelAttention,
                               SparseChannelGroupAttention, SparseCrossCovarianceAttention, SparseFourierPositions,
                               SparseGlobalContext, SparseGridAttention, SparseGroupedQueryAttention,
                               SparseFactorAttention, SparseHaloAttention, SparseLambdaMixing, SparseLinearAttention,
                               SparseMaskUnitAttention,
                               SparseOffsetBiasAttention, SparsePackedQkvAttention, SparsePoolingAttention,
                               SparseRelativeLogitsAttention, SparseSelfAttention, SparseSeparableGridAttention,
                               SparseWindowAttention, on_canvas_sites, visible_means)


def dense_to_me_kernel(weight: Tensor) -> Tensor:
    """(C_out, C_in, kh, kw) -> ME's (kernel_volume, C_in, C_out).

    ME stores some 1x1 kernels as (C_in, C_out): callers reshape to the parameter's shape."""
    c_out, c_in, kh, kw = weight.shape
    return weight.permute(3, 2, 1, 0).reshape(kh * kw, c_in, c_out)


def me_to_dense_kernel(kernel: Tensor, kernel_size: tuple[int, int]) -> Tensor:
    kh, kw = kernel_size
    c_in, c_out = kernel.shape[-2:]
    return kernel.reshape(kw, kh, c_in, c_out).permute(3, 2, 1, 0).contiguous()


# "patch": our patch-tile convolutions and pooling (patch_conv.py), measured faster on CPU for
# every layer of a ResNet, the 3-channel 7x7 stem included; "minkowski": ME's own modules.
CONV_IMPLS = ("patch", "minkowski")
# ME's own operators: float32/float64 only, so no autocast
STOCK_MODULES = (ME.MinkowskiConvolution, ME.MinkowskiMaxPooling, ME.MinkowskiAvgPooling)


def check_stock_modules(device: torch.device, autocast: bool = False) -> None:
    """Refuse, in one line, what MinkowskiEngine's own modules (conv='minkowski') cannot run:
    autocast, and CUDA tensors with a CPU-only build (our operators need no CUDA build)."""
    if autocast:
        raise ValueError("conv='minkowski' runs MinkowskiEngine's own float32/float64 operators, which "
                         "cannot autocast (precision bf16/fp16); use conv='patch', the default")
    if device.type == "cuda" and not ME.is_cuda_available():
        raise ValueError("conv='minkowski' runs MinkowskiEngine's own kernels, and this MinkowskiEngine is "
                         "a CPU-only build: on CUDA use conv='patch', the default (it needs no CUDA build)")


def _copy_weights(dense: nn.Module, sparse: nn.Module) -> nn.Module:
    sparse.load_state_dict(dense.state_dict())
    return sparse.train(dense.training)


def _top_left_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """The zero padding above and left of the map. timm's dynamic TensorFlow 'same' padding
    (Conv2dSame, StdConv2dSame) pads (k - s) // 2 there on sides the stride divides, as every map
    of a mask on the 32-pixel grid has where a stride-2 layer reads it (the rest goes below and
    right, where absent sites read zero as the padding does)."""
    if isinstance(conv, Conv2dSame) or getattr(conv, "same_pad", False):
        return tuple(max(k - s, 0) // 2 for k, s in zip(conv.kernel_size, conv.stride))
    if isinstance(conv, ZeroPaddedConv2d):
        left, _, top, _ = conv.pad
        return top, left
    return conv.padding


def _sparse_conv(conv: nn.Conv2d, path: str, impl: str) -> nn.Module:
    kh, kw = conv.kernel_size
    (sh, sw), (ph, pw) = conv.stride, _top_left_padding(conv)
    band = (type(conv) is nn.Conv2d and min(kh, kw) == 1 < max(kh, kw) and max(kh, kw) % 2 == 1
            and conv.groups == conv.in_channels == conv.out_channels and (sh, sw) == (1, 1)
            and (ph, pw) == (kh // 2, kw // 2) and conv.dilation == (1, 1) and conv.padding_mode == "zeros")
    if band:  # InceptionNeXt's 1 x k and k x 1 depthwise convolutions
        if impl == "minkowski":
            raise unsupported(conv, path, "conv='minkowski' has no depthwise convolution; use 'patch'")
        return _copy_weights(conv, BandDepthwiseConvolution(conv.out_channels, (kh, kw), conv.bias is not None))
    if conv.dilation != (1, 1):
        return _dilated_conv(conv, path, impl)
    if kh != kw or sh != sw or ph != pw or conv.padding_mode != "zeros":
        raise unsupported(conv, path, f"kernel {conv.kernel_size}, stride {conv.stride}, padding "
                                      f"{conv.padding}, dilation {conv.dilation}: not square and plain")
    # an explicit zero pad at stride 1 that keeps every site (CPUBone's 2x2 one above and left)
    padded = isinstance(conv, ZeroPaddedConv2d)
    if padded and not (sh == 1 and conv.pad[0] + conv.pad[1] == kh - 1 and conv.pad[2:] == conv.pad[:2]):
        raise unsupported(conv, path, f"zero pad {conv.pad} before a {kh}x{kh} convolution at stride {sh}: "
                                      "only stride 1 with the same padding both ways, keeping the map's size")
    centred = kh % 2 == 1 and ph == kh // 2
    # TensorFlow's 'same' at stride 2: the window starts one site later (patch_sites.tile_geometry)
    shifted = kh % 2 == 1 and sh == 2 and ph == kh // 2 - 1
    # and for an even kernel at stride 1 (HGNetV2's 2x2 stem): one site more below and right; at
    # stride s, a padding of (k - s) / 2 each side keeps one window per s sites (the 6x6 stride-2
    # "focus" stem of YOLOv5 and cs3darknet_focus_*: output i reads 2i - 2 .. 2i + 3)
    same = isinstance(conv, Conv2dSame) or getattr(conv, "same_pad", False)
    even = kh % 2 == 0 and (((same or padded) and sh == 1) or (1 < sh < kh and 2 * ph == kh - sh))
    # non-overlapping windows inside one visible block, one group per channel or more (CPUBone's
    # depthwise 2x2 at stride 2 before its attention)
    patchify = kh == sh > 1 and ph == 0
    # an odd kernel at a stride above 2 whose padding still makes one window per s sites (the map's
    # side / s outputs): MetaFormer's 7x7 stride-4 stem, padding 2, output i reading 4i - 2 .. 4i + 4
    fitted = (kh % 2 == 1 and not centred and sh > 2 and sh & (sh - 1) == 0 and type(conv) is nn.Conv2d
              and kh - sh <= 2 * ph < kh)
    padding = ph if shifted or even or fitted else None
    bias = conv.bias is not None
    scaled = isinstance(conv, (ScaledStdConv2d, ScaledStdConv2dSame))  # NFNet's: times a learned gain
    if scaled or isinstance(conv, (StdConv2d, StdConv2dSame)):
        # grouped: NFNet's k x k only (not depthwise)
        unmirrored_groups = conv.groups != 1 and not (scaled and conv.groups < conv.out_channels)
        if impl == "minkowski" or unmirrored_groups or not (centred or shifted):
            raise unsupported(conv, path, f"weight-standardised convolution with conv='{impl}', "
                                          f"{conv.groups} groups, kernel {kh}, padding {ph}")
        if conv.groups != 1:
            grouped = ScaledStdGroupedConvolution(conv.in_channels, conv.out_channels, kh, sh, conv.groups, bias,
                                                  padding, eps=conv.eps, scale=conv.scale)
            return _copy_weights(conv, grouped)
    elif (shifted or even or fitted) and impl == "minkowski":
        raise unsupported(conv, path, "conv='minkowski' centres its kernels; a window off the centre "
                                      "(TensorFlow 'same' padding, an even kernel, a padding less than "
                                      "half the kernel) needs conv='patch'")
    if conv.groups > 1 and kh == 1 and ph == 0 and impl == "patch":  # no neighbours: rows and GEMMs
        return _copy_weights(conv, GroupedPointwise(conv.in_channels, conv.out_channels, conv.groups, sh, bias))
    if conv.groups == conv.in_channels == conv.out_channels > 1 and (centred or shifted) and sh in (1, 2):
        if impl == "minkowski":
            raise unsupported(conv, path, "conv='minkowski' has no depthwise convolution; use 'patch'")
        depthwise = DepthwiseConvolution(conv.out_channels, kh, bias, stride=sh, padding=padding)
        return _copy_weights(conv, depthwise)
    if conv.groups != 1:  # an even one: EfficientNet-X's depthwise 2x2 after a space-to-depth convolution
        if impl == "minkowski" or not (centred or shifted or even or patchify):
            raise unsupported(conv, path, f"grouped convolution ({conv.groups} groups) with conv='{impl}', "
                                          f"kernel {kh}, padding {ph}")
        grouped = GroupedConvolution(conv.in_channels, conv.out_channels, kh, sh, conv.groups, bias, padding)
        return _copy_weights(conv, grouped)
    if patchify:
        if impl == "minkowski":
            raise unsupported(conv, path, "conv='minkowski' has no patchify convolution; use 'patch'")
        return _copy_weights(conv, PatchifyConvolution(conv.in_channels, conv.out_channels, kh, bias))
    if not (centred or shifted or fitted or (even and conv.groups == 1)):
        raise unsupported(conv, path, f"kernel {kh}, stride {sh}, padding {ph} is not a centred "
                                      "odd kernel, TensorFlow 'same' padding, a non-overlapping one nor "
                                      "one window per stride")
    settings = dict(kernel_size=kh, stride=sh, bias=conv.bias is not None, dimension=2)
    if impl == "minkowski":
        sparse = ME.MinkowskiConvolution(conv.in_channels, conv.out_channels, **settings)
    elif scaled:
        sparse = ScaledStdPatchConvolution(conv.in_channels, conv.out_channels, padding=padding, eps=conv.eps,
                                           scale=conv.scale, **settings)
    elif isinstance(conv, (StdConv2d, StdConv2dSame)):
        sparse = StdPatchConvolution(conv.in_channels, conv.out_channels, padding=padding, eps=conv.eps, **settings)
    else:
        sparse = PatchConvolution(conv.in_channels, conv.out_channels, padding=padding, **settings)
    with torch.no_grad():
        sparse.kernel.copy_(dense_to_me_kernel(conv.weight).view_as(sparse.kernel))
        if conv.bias is not None:
            sparse.bias.copy_(conv.bias.view(1, -1))
        if scaled:
            sparse.gain.copy_(conv.gain)
    sparse.train(conv.training)
    return sparse


def _dilated_conv(conv: nn.Conv2d, path: str, impl: str) -> DilatedConvolution:
    """SKNet's 3x3 with dilation 2 (its "5x5" path): centred, square, stride 1 or 2, any groups."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    centred = conv.padding == (dh * (kh // 2), dw * (kw // 2))
    if type(conv) is not nn.Conv2d or kh != kw or kh % 2 == 0 or dh != dw or sh != sw or sh not in (1, 2) \
            or not centred or conv.padding_mode != "zeros" or impl == "minkowski":
        raise unsupported(conv, path, f"dilated convolution (kernel {conv.kernel_size}, stride {conv.stride}, padding "
                                      f"{conv.padding}, dilation {conv.dilation}) with conv='{impl}': only centred "
                                      "square odd ones at stride 1 or 2, with conv='patch'")
    dilated = DilatedConvolution(conv.in_channels, conv.out_channels, kh, sh, conv.groups, conv.bias is not None,
                                 dilation=dh)
    return _copy_weights(conv, dilated)


def _sparse_bn(bn: nn.BatchNorm2d, path: str) -> ME.MinkowskiBatchNorm:
    sparse = ME.MinkowskiBatchNorm(bn.num_features, eps=bn.eps, momentum=bn.momentum,
                                   affine=bn.affine, track_running_stats=bn.track_running_stats)
    sparse.bn.load_state_dict(bn.state_dict())
    sparse.train(bn.training)
    return sparse


class SparseBatchNormAct(ME.MinkowskiBatchNorm):
    """Batch norm over the visible rows, then an elementwise activation on them (timm's
    BatchNormAct2d, or a block's norm and the activation after it): it keeps only its input for
    backward, and the operator after it need not keep the rows it returns (row_saving.py)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, act: nn.Module):
        super().__init__(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                         track_running_stats=bn.track_running_stats)
        self.act = copy.deepcopy(act)
        if hasattr(self.act, "inplace"):
            self.act.inplace = False  # its input is recomputed, and a leaf, in backward
        self.bn.load_state_dict(bn.state_dict())
        self.train(bn.training)

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        if isinstance(self.act, nn.Identity):
            return with_features(x, self.bn(x.F))
        if type(self.bn) is not nn.BatchNorm1d:  # e.g. synchronised across processes: run as it is
            return with_features(x, self.act(self.bn(x.F)))
        return with_features(x, batch_norm_act(x.F, self.bn, self.act))


def fuse_norm_acts(body: nn.Module, norm_acts: Mapping[type, tuple[tuple[str, str], ...]]) -> None:
    """Run each batch norm and activation that the family declares back to back in a block
    (``Family.norm_acts``) as one ``SparseBatchNormAct``: the convolution after it then keeps no
    rows of its own for backward. Weights and their names are unchanged (activations hold none)."""
    for block in body.modules():
        for norm, act in norm_acts.get(type(block), ()):
            bn, sparse_act = getattr(block, norm), getattr(block, act)
            if isinstance(sparse_act, ME.MinkowskiReLU):
                activation = nn.ReLU()
            elif isinstance(sparse_act, SparseActivation):
                activation = sparse_act.act
            else:
                continue
            if type(bn) is ME.MinkowskiBatchNorm:
                setattr(block, norm, SparseBatchNormAct(bn.bn, activation))
            elif type(bn) is SparseGroupNormAct and isinstance(bn.act, nn.Identity):  # ResNet's *_gn
                setattr(block, norm, SparseGroupNormAct(bn, activation))
            else:
                continue
            setattr(block, act, nn.Identity())


def recompute_pointwise_norms(body: nn.Module, pointwise_norms: Mapping[type, tuple[str, ...]]) -> None:
    """Run each 1x1 conv-norm the family names (``Family.pointwise_norms``) as one
    ``PointwiseNorm``, which keeps no product for backward. Weights and names are unchanged."""
    for block in list(body.modules()):
        for name in pointwise_norms.get(type(block), ()):
            branch = getattr(block, name, None)
            conv, bn = getattr(branch, "conv", None), getattr(branch, "bn", None)
            if (type(conv) is PatchConvolution and int(conv.kernel_generator.kernel_size[0]) == 1
                    and conv.bias is None and isinstance(bn, ME.MinkowskiBatchNorm)
                    and isinstance(getattr(bn, "act", nn.Identity()), nn.Identity)
                    and getattr(branch, "aa", None) is None):
                setattr(block, name, PointwiseNorm(conv, bn))


def _sparse_pool(pool: nn.Module, path: str, impl: str) -> nn.Module:
    k, s, p = pool_geometry(pool)
    stock = impl == "minkowski"
    if isinstance(pool, nn.MaxPool2d):
        check_max_pool(pool, path)
    if isinstance(pool, nn.MaxPool2d) and (k, s, p) == (3, 2, 1):
        # after a ReLU, the zeros a dense max-pool would see at hidden sites never win
        return ME.MinkowskiMaxPooling(3, stride=2, dimension=2) if stock else PatchPooling("max", 3, 2)
    if isinstance(pool, nn.MaxPool2d) and (k, s, p) == (3, 2, 0):
        # VoVNet's: unpadded, its ceil_mode keeps the last window over an even map's edge: the
        # window starts at the output's own site (TensorFlow's 'same' there, NesT's _jx ports' MaxPool2dSame)
        if stock:
            raise unsupported(pool, path, "conv='minkowski' centres its pooling windows; this unpadded one "
                                          "needs conv='patch'")
        return PatchPooling("max", 3, 2, padding=0)
    if isinstance(pool, nn.MaxPool2d) and s == 1:
        # CSPNeXt's spatial pyramid (5, 9, 13 at stride 32): wider than a patch's halo, on the canvas
        if stock:
            raise unsupported(pool, path, f"a {k}x{k} stride-1 max pooling with conv='minkowski'; use conv='patch'")
        return PatchPooling("max", k, 1)
    if isinstance(pool, nn.AvgPool2d) and (k, p) == (3, 1) and s in (1, 2) and not pool.ceil_mode:
        if not pool.count_include_pad:
            # PoolFormer's, its padding uncounted: the mean of the window's present sites (absent ones
            # are not counted either: torch's where nothing is hidden, canvas-invariant)
            if stock:
                raise unsupported(pool, path, "an average pooling of present sites with conv='minkowski'; "
                                              "use conv='patch'")
            return PatchPooling("avg", 3, s, present_only=True)
        # Res2Net's and ResNeSt's: hidden sites read zero and are counted, as the padding (a fixed
        # depthwise convolution); MinkowskiEngine's divides by the present sites instead
        if stock:
            raise unsupported(pool, path, "a 3x3 average pooling with conv='minkowski' (it divides by the present "
                                          "sites, not by 9); use conv='patch'")
        return PatchPooling("avg", 3, s)
    if isinstance(pool, nn.AvgPool2d) and (k, s, p) == (1, 2, 0):
        # EfficientFormerV2's query subsampling: each 2x2 block's first site, inside one patch
        if stock:
            raise unsupported(pool, path, "a 1x1 stride-2 pooling with conv='minkowski'; use conv='patch'")
        return PatchPooling("avg", 1, 2)
    if (k, s, p) == (2, 2, 0):
        # avg-down shortcuts, anti-aliasing, VGG's and DenseNet's pooling: mask-aligned 2x2
        # windows are fully visible or fully hidden
        if isinstance(pool, nn.AvgPool2d):
            return ME.MinkowskiAvgPooling(2, stride=2, dimension=2) if stock else PatchPooling("avg", 2, 2)
        return ME.MinkowskiMaxPooling(2, stride=2, dimension=2) if stock else PatchPooling("max", 2, 2)
    raise unsupported(pool, path, f"kernel {k}, stride {s}, padding {p}")


def _sparse_zero_padded_pool(module: ZeroPaddedMaxPool, path: str, impl: str) -> PatchPooling:
    pad, pool = module.pad.padding, module.pool
    geometry = (to_2tuple(pool.kernel_size), to_2tuple(pool.stride), to_2tuple(pool.dilation))
    # BiT's: 3x3 stride 2 over a map padded by 1 (floor, as timm's); HGNetV2's: 2x2 stride 1, padded
    # below and right (its ceil_mode changes nothing there)
    bit = pad == (1, 1, 1, 1) and geometry == ((3, 3), (2, 2), (1, 1)) and not pool.ceil_mode
    hgnet = pad == (0, 1, 0, 1) and geometry == ((2, 2), (1, 1), (1, 1))
    if impl == "minkowski" or not (bit or hgnet):
        raise unsupported(module, path, f"zero pad {pad} then max pooling (kernel {pool.kernel_size}, stride "
                                        f"{pool.stride}) with conv='{impl}': only a 3x3 stride-2 one padded "
                                        "by 1, or a 2x2 stride-1 one padded below and right, with conv='patch'")
    k = geometry[0][0]
    return PatchPooling("max", k, geometry[1][0], fill=0.0)  # hidden sites read zero, as the padding


class SparseCondConv(CondConvExperts):
    """CondConv as its experts' convolutions weighted per row by its image's routing: a convolution
    is linear in its kernel, so this is the per-image mixed kernel's, exactly, at E times the arithmetic.
    Each expert runs through one operator of the layer's geometry, its tensors passed per call
    (``functional_call``): the operator's own are never used, nor registered."""

    def __init__(self, module: CondConv2d, path: str, impl: str):
        super().__init__(module)
        conv_class = Conv2dSame if module.dynamic_padding else nn.Conv2d
        plain = conv_class(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                           0 if module.dynamic_padding else module.padding, module.dilation, module.groups, bias=False)
        self._op = (_sparse_conv(plain, path, impl),)

    def forward(self, x: ME.SparseTensor, routing: Tensor) -> ME.SparseTensor:
        op = self._op[0]
        me_layout = isinstance(op, ME.MinkowskiConvolution)  # its `kernel` parameter; ours keep timm's `weight`
        out = image = None
        for e in range(self.num_experts):
            w = self.expert_weight(e)
            tensors = {"kernel": dense_to_me_kernel(w).view_as(op.kernel)} if me_layout else {"weight": w}
            y = torch.func.functional_call(op, tensors, (x,))
            image = image_of_rows(y) if image is None else image
            term = y.F * routing.index_select(0, image)[:, e:e + 1].to(y.F.dtype)
            out = term if out is None else out + term
        if self.bias is not None:
            out = out + (routing @ self.bias).index_select(0, image).to(out.dtype)
        return with_features(y, out)


class SparseDfcGate(DfcGate):
    """GhostNetV2's gate made on the whole images' map of the input rows (zeros where hidden) and
    gathered at them: the output rows times it."""

    def forward(self, x: ME.SparseTensor, out: ME.SparseTensor) -> ME.SparseTensor:
        same_sites(x, out, "gate")
        gate = on_canvas_sites(x, lambda canvas, present: self.gate(
            canvas.permute(0, 3, 1, 2), present[:, None].to(canvas.dtype)).permute(0, 2, 3, 1))
        return with_features(out, out.F * gate.F)


class SparseChannelSplit(ChannelSplit):
    """The first channels of each row, and the rest, on the same sites."""

    def forward(self, x: ME.SparseTensor) -> tuple[ME.SparseTensor, ME.SparseTensor]:
        return tuple(with_features(x, f) for f in super().forward(x.F))


class SparseChannelConcat(ChannelConcat):
    """Tensors' channels side by side, on the sites they share."""

    def forward(self, *tensors: ME.SparseTensor) -> ME.SparseTensor:
        for other in tensors[1:]:
            same_sites(tensors[0], other, "concatenate channels of")
        return with_features(tensors[0], super().forward(*(t.F for t in tensors)))


class SparseTiledTokens(TiledTokens):
    """Each row of the finer map takes its token's row (a zero row where that token is hidden)."""

    def forward(self, tokens: ME.SparseTensor, like: ME.SparseTensor) -> ME.SparseTensor:
        sites, (coarse, fine) = PatchSites.of(like), (tokens.tensor_stride[0], like.tensor_stride[0])
        self.check(sites.canvas_shape(coarse)[1:], sites.canvas_shape(fine)[1:])
        index = sites.tiled_rows(fine, coarse)
        return with_features(like, with_zero_row(tokens.F).index_select(0, index))


class SparseHeadLayerNorm(HeadLayerNorm):
    """MViTv2's per-head layer norm of each row."""

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        return with_features(x, self.rows(x.F))


class SparseProduct(Product):
    """Two tensors' rows multiplied elementwise, on the sites they share."""

    def forward(self, a: ME.SparseTensor, b: ME.SparseTensor) -> ME.SparseTensor:
        same_sites(a, b, "multiply")
        return with_features(a, super().forward(a.F, b.F))


class SparseGatedImageVector(GatedImageVector):
    """Each row's gate times its image's vector."""

    def forward(self, gate: ME.SparseTensor, vector: Tensor) -> ME.SparseTensor:
        return with_features(gate, gate.F * vector.to(gate.F.dtype).index_select(0, image_of_rows(gate)))


class SparseImageMean(ImageMean):
    """Each image's mean over its visible rows."""

    def forward(self, x: ME.SparseTensor) -> Tensor:
        return visible_means(x)


class SparseImageFactor(ImageFactor):
    """Each row times its image's factor."""

    def forward(self, x: ME.SparseTensor, factors: Tensor) -> ME.SparseTensor:
        return with_features(x, x.F * factors.to(x.F.dtype).index_select(0, image_of_rows(x))[:, None])


class SparseRadixSum(RadixSum):
    """Each row's radix groups of channels times its image's weights, summed."""

    def forward(self, x: ME.SparseTensor, weights: Tensor) -> ME.SparseTensor:
        n, rc = x.F.shape
        per_row = weights.index_select(0, image_of_rows(x)).view(n, self.radix, -1)
        return with_features(x, (x.F.view(n, self.radix, rc // self.radix) * per_row).sum(1))


def _sparse_layer_norm(norm: nn.LayerNorm, act: nn.Module | None = None) -> SparseLayerNorm:
    """A layer norm's twin (with its activation's twin, LayerNormAct2d's, where given), timm's tensors copied."""
    args = (norm.normalized_shape, norm.eps, norm.elementwise_affine)
    bias = norm.bias is not None
    sparse = SparseLayerNorm(*args, bias=bias) if act is None else SparseLayerNormAct(*args, bias=bias, act=act)
    return _copy_weights(norm, sparse)


# leaves that rearrange the rows of whole patches: not MinkowskiEngine's own maps
PATCH_ROWS_ONLY = {BlurPool2d: "blur pooling", SpaceToDepth: "space to depth",
                   ColumnsFirstSpaceToDepth: "space to depth", nn.Upsample: "upsampling",
                   nn.ConvTranspose2d: "transposed convolution", nn.AdaptiveAvgPool2d: "adaptive pooling"}


class SparseRmsNorm(SiteRmsNorm):
    """An RMS norm of each row's channels (MobileNetV5's)."""

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        return with_features(x, self.rows(x.F))


def convert_leaf(module: nn.Module, path: str, conv: str = "patch") -> nn.Module:
    """One timm leaf -> its sparse twin; ``conv`` picks the ResNet convolution implementation."""
    if conv not in CONV_IMPLS:
        raise ValueError(f"conv must be one of {CONV_IMPLS}, got '{conv}'")
    kind = type(module)
    if kind in CONVOLUTIONS:
        return _sparse_conv(module, path, conv)
    if kind is nn.BatchNorm2d:
        return _sparse_bn(module, path)
    if kind is BatchNormAct2d:
        check_norm_act(module, path)
        return SparseBatchNormAct(module, module.act)
    if kind is GroupNormAct:
        check_norm_act(module, path)
        return SparseGroupNormAct(module, module.act)
    if kind in GROUP_NORMS:
        return SparseGroupNormAct(module, nn.Identity())
    if kind in LAYER_NORMS:
        return _sparse_layer_norm(module)
    if kind in RMS_NORMS:
        return SparseRmsNorm(module, path)
    if kind is LayerNormAct2d:
        check_norm_act(module, path)
        return _sparse_layer_norm(module, convert_leaf(module.act, f"{path}.act", conv))
    if kind is nn.Linear:
        linear = SparseLinear(module.in_features, module.out_features, module.bias is not None)
        return _copy_weights(module, linear)
    if kind is nn.ReLU:
        return ME.MinkowskiReLU()
    if kind in ACTIVATIONS or kind in ZERO_MOVING or kind in DROPOUTS:
        return SparseActivation(copy.deepcopy(module))
    if kind is GlobalResponseNorm:
        return _copy_weights(module, SparseGlobalResponseNorm(module.weight.shape[0], module.eps))
    if kind is LayerScale:
        return SparseLayerScale()
    if kind in ATTENTION:
        return SparseChannelAttention(module, path)
    if kind is GlobalContext:
        return SparseGlobalContext(module, path)
    if kind is LinearAttention:
        return SparseLinearAttention(module.dim, module.eps)
    if kind is EfficientAdditiveAttention:
        return SparseAdditiveAttention(module, path)
    if kind is CrossCovarianceAttention:
        return SparseCrossCovarianceAttention(module.num_heads)
    if kind is RelativeLogitsAttention:
        return module.like(SparseRelativeLogitsAttention)
    if kind is HaloAttention:
        return module.like(SparseHaloAttention)
    if kind is MaskUnitAttention:
        return module.like(SparseMaskUnitAttention)
    if kind is AbsolutePositions:
        return SparseAbsolutePositions()
    if kind is LambdaMixing:
        return module.like(SparseLambdaMixing)
    if kind is PositionLambdas:
        return _copy_weights(module, SharedKernelsDepthwise(module.weight.shape[0], module.value_dim,
                                                            module.kernel_size))
    if kind is HeadSharedConv2d:
        if conv == "minkowski":
            raise unsupported(module, path, "conv='minkowski' has no depthwise convolution; use 'patch'")
        return _copy_weights(module, HeadSharedDepthwise(module.heads, module.weight.shape[0], module.kernel_size,
                                                         module.stride))
    if kind is HeadLayerNorm:
        return SparseHeadLayerNorm(module, module.heads)
    if kind is PoolingAttention:
        return module.like(SparsePoolingAttention)
    if kind is FactorAttention:
        return SparseFactorAttention(module.num_heads, module.scale)
    if kind is OffsetBiasAttention:
        return module.like(SparseOffsetBiasAttention)
    if kind is ChannelGroupAttention:
        return SparseChannelGroupAttention(module.num_heads, module.head_dim, module.v2, module.dynamic_scale)
    if kind is PositionalEncodingFourier:
        return SparseFourierPositions(module, path)
    if kind in SELF_ATTENTION:
        return SparseSelfAttention(module, path)
    if kind is PackedQkvAttention:
        return SparsePackedQkvAttention(module.num_heads, module.key_dim)
    if kind is GroupedQueryAttention:
        return SparseGroupedQueryAttention(module.num_heads, module.key_dim, module.value_dim,
                                            module.kv_heads)
    if kind is WindowAttention:
        return module.like(SparseWindowAttention)
    if kind is GridAttention:
        return module.like(SparseGridAttention)
    if kind is SeparableGridAttention:
        return SparseSeparableGridAttention(module.dim, module.grid)
    if kind is CondConv2d:
        return SparseCondConv(module, path, conv)
    if kind is DfcGate:
        return SparseDfcGate(module)
    if kind in (EvoNorm2dS0, EvoNorm2dS0a):
        return SparseEvoNorm(module)
    if kind is FilterResponseNormTlu2d:
        return SparseFilterResponseNorm(module)
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        return _sparse_pool(module, path, conv)
    if kind is ZeroPaddedMaxPool:
        return _sparse_zero_padded_pool(module, path, conv)
    if kind in PATCH_ROWS_ONLY and conv == "minkowski":  # its strided modules order their rows their own way
        raise unsupported(module, path, f"conv='minkowski' has no {PATCH_ROWS_ONLY[kind]} of patch rows; use 'patch'")
    if kind is BlurPool2d:
        try:
            return PatchBlurPool(module.filt, module.stride, module.padding, module.pad_mode)
        except ValueError as err:
            raise unsupported(module, path, str(err)) from None
    if kind is SpaceToDepth:
        return PatchSpaceToDepth(module.bs)
    if kind is ColumnsFirstSpaceToDepth:
        return PatchSpaceToDepth(module.block_size, columns_first=True)
    if kind is nn.Upsample:
        return PatchUpsample(upsample_scale(module, path), module.mode)
    if kind is nn.AdaptiveAvgPool2d:
        return PatchGridPool(adaptive_pool_size(module, path))
    if kind is nn.ConvTranspose2d:
        k, s, p = transposed_geometry(module, path)
        return _copy_weights(module, TransposedConvolution(module.in_channels, module.out_channels, k, s, p,
                                                           module.groups, module.bias is not None))
    if kind is LearnableAffineBlock:
        return _copy_weights(module, SparseScalarAffine())
    if kind is StarReLU:
        return _copy_weights(module, SparseStarReLU())
    if kind is DropPath:
        return SparseDropPath(module.drop_prob)
    if kind is ChannelSplit:
        return SparseChannelSplit(module.first)
    if kind is ChannelConcat:
        return SparseChannelConcat()
    if kind is Product:
        return SparseProduct()
    if kind is TiledTokens:
        return SparseTiledTokens(module.window)
    if kind is ImageMean:
        return SparseImageMean()
    if kind is GatedImageVector:
        return SparseGatedImageVector()
    if kind is RadixSum:
        return SparseRadixSum(module.radix)
    if kind is ImageFactor:
        return SparseImageFactor()
    if kind is nn.Identity:
        return nn.Identity()
    raise unsupported(module, path)


class SparseEncoder(Encoder):
    """A timm convnet (ResNet, ConvNeXt) as genuine sparse operators over the visible pixels.

    >>> enc = SparseEncoder.from_timm(timm.create_model("resnet50", num_classes=0))
    >>> feats = enc(images, active)            # 4 ME.SparseTensor, strides 4..32
    >>> maps = enc.dense_features(images, active)  # 4 dense (B, C, h, w), zeros where hidden
    """

    convert_leaf = staticmethod(convert_leaf)

    def __init__(self, body: nn.ModuleDict, *args, **kwargs):
        super().__init__(body, *args, **kwargs)
        stem = self.family.stem_pool
        if (stem and isinstance(body[stem.pool], PatchPooling) and body[stem.pool].mode == "max"
                and isinstance(body[stem.act], ME.MinkowskiReLU)):
            # ReLU and max pooling commute; pooling first means the stem's stride-2 ReLU output
            # (the largest map after the input) is never made, and the ReLU that remains runs
            # on a quarter of the rows and keeps what the next convolution keeps anyway
            body[stem.pool].relu = True
            body[stem.act] = nn.Identity()
        fuse_norm_acts(body, self.family.norm_acts)
        recompute_pointwise_norms(body, self.family.pointwise_norms)
        self.stock_modules = any(type(m) in STOCK_MODULES for m in body.modules())

    def plan(self, active: Tensor, device: torch.device | str, like: SparseLayout | None = None) -> SparseLayout:
        # MinkowskiEngine's own modules read coordinate maps in C++: registered as they are made
        return plan_layout(active, self.stride, device, insert=self.stock_modules,
                           like=like.sites if like is not None else None)

    def copy_plan_(self, plan: SparseLayout, other: SparseLayout) -> None:
        if self.stock_modules:  # their kernel maps are made in C++ during the step
            raise ValueError("MinkowskiEngine's own modules (conv='minkowski') cannot be captured and replayed")
        copy_layout_(plan, other)

    def encode_input(self, images: Tensor, active: Tensor, layout: SparseLayout | None = None) -> ME.SparseTensor:
        if self.stock_modules:
            check_stock_modules(images.device, autocast_dtype(images.device.type) is not None)
        return sparsify(images, active, insert=self.stock_modules, layout=layout)

    def to_dense(self, feature: ME.SparseTensor, batch: int, size: tuple[int, int]) -> Tensor:
        return to_dense(feature, batch, size)

    def timm_key(self, key: str) -> str:
        module, _, name = key.rpartition(".")
        # MinkowskiBatchNorm keeps its tensors in an inner `.bn`; timm's norm holds them itself
        if module.endswith(".bn") and isinstance(self.get_submodule(module[:-3]), ME.MinkowskiBatchNorm):
            key = f"{module[:-3]}.{name}"
        key = super().timm_key(key)
        return key[: -len("kernel")] + "weight" if key.endswith(".kernel") else key

    def tensor_to_timm(self, key: str, value: Tensor) -> Tensor:
        if key.endswith(".kernel"):
            return me_to_dense_kernel(value, self._kernel_size(key))
        if key.endswith(".bias") and value.dim() == 2:  # ME conv bias is (1, C_out)
            return value.view(-1)
        return value

    def tensor_from_timm(self, key: str, value: Tensor) -> Tensor:
        if key.endswith(".kernel"):
            return dense_to_me_kernel(value).view_as(self.get_parameter(key))
        if key.endswith(".bias") and isinstance(self.get_submodule(key.rsplit(".", 1)[0]),
                                                ME.MinkowskiConvolution):
            return value.view(1, -1)
        return value

    def _kernel_size(self, key: str) -> tuple[int, int]:
        conv = self.get_submodule(key[: -len(".kernel")])
        k = conv.kernel_generator.kernel_size
        return int(k[0]), int(k[1])
