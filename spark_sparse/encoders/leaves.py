"""Engine-neutral leaves: the small modules families put into their mirrors where timm's blocks do
the work inline (a channel split, a concatenation, a product, an image's mean, ...), the timm leaf
types every engine converts (activations, convolutions, norms), and the checks that a timm leaf
keeps the mask's grid (pooling, upsampling, transposed convolution geometry). Each engine turns
every leaf into its own twin (sparse_engine.py, masked_engine.py)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from timm.layers import (Conv2dSame, GroupNorm, GroupNorm1, LayerNorm, LayerNorm2d, RmsNorm2d, RmsNormAct2d,
                         ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame)
from timm.layers import activations as timm_act
from timm.layers.fast_norm import rms_norm2d
from timm.layers.pool2d_same import MaxPool2dSame
from timm.models.metaformer import GroupNorm1NoBias, LayerNorm2dNoBias, LayerNormNoBias
from timm.models.nfnet import GammaAct
from torch import nn

from .refusals import reject_extras, unsupported


class ZeroPaddedMaxPool(nn.Module):
    """timm's zero ``ConstantPad2d`` then an unpadded ``MaxPool2d`` (BiT's "fixed" stem, with no
    activation before it), as one leaf: a max pooling whose padding reads zero. The engines let
    hidden sites read zero too, as the padding does (and SparK's masked maps): the pooling is then
    timm's with nothing hidden, and an image's features are the same with or without a hidden
    canvas around it."""

    def __init__(self, pad: nn.ConstantPad2d, pool: nn.MaxPool2d):
        super().__init__()
        self.pad, self.pool = copy.deepcopy(pad), copy.deepcopy(pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.pad(x))


class ZeroPaddedConv2d(nn.Conv2d):
    """timm's zero pad then an unpadded plain convolution (CPUBone's 2x2 kernels at stride 1, padded
    one site above and left), as one convolution leaf with that padding: ``pad`` is
    (left, right, top, bottom), as ``nn.ZeroPad2d`` takes it. Weights keep the convolution's names."""

    def __init__(self, pad: nn.ConstantPad2d, conv: nn.Conv2d):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                         conv.groups, conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
        self.pad = tuple(pad.padding)
        self.load_state_dict(conv.state_dict())
        self.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.nn.functional.pad(x, self.pad))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pad={self.pad}"


class Scale(nn.Module):
    """Multiplication by a constant (NFNet's residual scalings): a leaf every engine runs as an
    elementwise activation, as it keeps zero at zero."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.value

    def extra_repr(self) -> str:
        return f"{self.value}"


# Elementwise activations that keep zero at zero: applied to visible rows they compute what the
# dense-masked engine computes without re-masking (ReLU has engine-specific twins). NFNet's
# GammaAct (an activation times a constant) keeps zero at zero for the activations its family allows.
ACTIVATIONS = (nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.Hardswish, nn.GELU, nn.Mish, timm_act.GELU, timm_act.GELUTanh,
               timm_act.Swish, timm_act.HardSwish, timm_act.Mish, GammaAct, Scale)


# Elementwise functions that move zero (a sigmoid gate, iFormer's): applied to visible rows they compute
# what the dense-masked engine computes, where hidden sites get values until masked
ZERO_MOVING = (nn.Sigmoid,)


# Dropout zeroes elements at random and keeps zero at zero (CPUBone's MLPs drop 0.1 by default): each
# engine draws its own mask, over the visible rows or the whole map, so the engines agree at p=0 or in
# eval, and in distribution otherwise
DROPOUTS = (nn.Dropout,)


# torch's convolution (and it after a zero pad) and timm's with TensorFlow 'same' padding and/or weight
# standardisation (the kernel normalised per output channel at every forward, NFNet's then scaled by a
# learned gain: a weight-only operation)
CONVOLUTIONS = (nn.Conv2d, ZeroPaddedConv2d, Conv2dSame, StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)


# torch's and timm's layer norms (channels last and channels first; MetaFormer's without a bias):
# every engine runs them per site
LAYER_NORMS = (nn.LayerNorm, LayerNorm, LayerNorm2d, LayerNormNoBias, LayerNorm2dNoBias)


# torch's and timm's group norms without an activation (ResNet's ``*_gn``; PoolFormer's of one group,
# with or without a bias): every engine runs them as timm's GroupNormAct with an identity, each
# image's statistics over its visible sites
GROUP_NORMS = (nn.GroupNorm, GroupNorm, GroupNorm1, GroupNorm1NoBias)


# timm's RMS norms of each site's channels (MobileNetV5's), with or without an activation
RMS_NORMS = (RmsNorm2d, RmsNormAct2d)


class SiteRmsNorm(nn.Module):
    """timm's RmsNorm2d or RmsNormAct2d of each site's channels (``rows``: timm's own function on
    (N, C) rows as N 1x1 maps, then the activation): every engine runs it on its visible sites.
    Its ``weight`` and ``act`` keep timm's names."""

    def __init__(self, norm: nn.Module, path: str):
        super().__init__()
        if isinstance(norm, RmsNormAct2d):
            check_norm_act(norm, path)
        self.normalized_shape, self.eps = norm.normalized_shape, norm.eps
        self.weight = None if norm.weight is None else nn.Parameter(norm.weight.detach().clone())
        self.act = copy.deepcopy(getattr(norm, "act", nn.Identity()))

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.act(rms_norm2d(rows[:, :, None, None], self.normalized_shape, self.weight, self.eps).flatten(1))


def check_norm_act(bn: nn.Module, path: str) -> None:
    """timm's BatchNormAct2d: its activation must be elementwise and its drop absent."""
    reject_extras(bn, path, ("drop",))
    if not isinstance(bn.act, (nn.Identity, nn.ReLU) + ACTIVATIONS):
        raise unsupported(bn.act, f"{path}.act", "not an elementwise activation with act(0) = 0")


class LayerScale(nn.Module):
    """A per-channel scale by a parameter its block owns (timm's ``gamma``, keeping timm's name);
    a leaf every engine converts to its own twin."""

    def forward(self, x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        return x * gamma.view(1, -1, 1, 1)


class ChannelSplit(nn.Module):
    """x -> (its first ``first`` channels, the rest): a cross-stage partial split (timm's
    ``x.split``), a leaf every engine converts to its own twin."""

    def __init__(self, first: int):
        super().__init__()
        self.first = first

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, :self.first], x[:, self.first:]

    def extra_repr(self) -> str:
        return f"first={self.first}"


class ColumnsFirstSpaceToDepth(nn.Module):
    """Each ``block_size`` x ``block_size`` block of sites into one site's channels, ordered by the
    column offset, then the row offset, then the channel (Swin's ``PatchMerging``; timm's
    ``SpaceToDepth`` puts the row offset first): a parameter-free leaf every engine converts."""

    def __init__(self, block_size: int):
        super().__init__()
        self.block_size = block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        k = self.block_size
        return x.view(b, c, h // k, k, w // k, k).permute(0, 5, 3, 1, 2, 4).reshape(b, k * k * c, h // k, w // k)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}"


def split_in_turn(splits: Sequence[nn.Module], x) -> list:
    """``x`` cut into ``len(splits) + 1`` groups of channels by ``ChannelSplit`` leaves taken in
    turn, each cutting the first group off the rest (timm's ``torch.split`` by sizes)."""
    groups = []
    for split in splits:
        group, x = split(x)
        groups.append(group)
    return groups + [x]


class ChannelConcat(nn.Module):
    """(a, b, ...) -> their channels side by side (timm's ``torch.cat(..., dim=1)``); a leaf every
    engine converts to its own twin."""

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return torch.cat(tensors, dim=1)


class Product(nn.Module):
    """(a, b) -> their elementwise product (a gated unit's gate times its value, as MambaOut's
    ``act(g) * torch.cat((i, c))``); a leaf every engine converts to its own twin."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b


class GatedImageVector(nn.Module):
    """(a one-channel gate map, (B, C) vectors) -> each site's gate times its image's vector, in the
    map's dtype (FocalNet's global context, ``ctx_global * gates[:, L:]``); a leaf every engine
    converts to its own twin."""

    def forward(self, gate: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        return gate * vector.to(gate.dtype)[:, :, None, None]


class ImageMean(nn.Module):
    """x -> (B, C): each image's mean over its sites (timm's ``x.mean((2, 3))``); a leaf every
    engine converts to its own twin, which takes the mean over the visible sites only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


class ImageFactor(nn.Module):
    """(x, (B,) factors) -> each image's map times its factor, in the map's dtype (a drop path drawn
    once per image for a map and the class token beside it); a leaf every engine converts to its
    own twin."""

    def forward(self, x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        return x * factors.to(x.dtype)[:, None, None, None]


class RadixSum(nn.Module):
    """(x with radix x C channels, (B, radix x C) weights) -> the radix groups of x's channels, each
    times its image's weights, summed: C channels (ResNeSt's split attention); a leaf every engine
    converts to its own twin."""

    def __init__(self, radix: int):
        super().__init__()
        self.radix = radix

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        b, rc, h, w = x.shape
        weighted = x.view(b, self.radix, rc // self.radix, h, w) * weights.view(b, self.radix, -1, 1, 1)
        return weighted.sum(1)

    def extra_repr(self) -> str:
        return f"radix={self.radix}"


def pool_geometry(pool: nn.Module) -> tuple[int, int, int]:
    """(kernel, stride, padding) of a square pooling module."""
    return tuple(v if isinstance(v, int) else v[0] for v in (pool.kernel_size, pool.stride, pool.padding))


def check_max_pool(pool: nn.MaxPool2d, path: str) -> None:
    """Refuse a max pooling whose windows do not map the mask's grid onto itself: both engines
    run a centred 3x3 at stride 2, VoVNet's unpadded 3x3 with ``ceil_mode`` and TensorFlow's 'same'
    one (NesT's ``_jx`` ports): on the even maps of a mask's grid both windows start at the output's
    own site; a 2x2 at stride 2 and a centred odd one at stride 1 (CSPNeXt's spatial pyramid). A zero
    pad then a max pooling (BiT, HGNetV2) is ``ZeroPaddedMaxPool``'s, checked apart."""
    k, s, p = pool_geometry(pool)
    centred_stride_1 = s == 1 and k % 2 == 1 and p == k // 2
    own_site = (k, s, p) == (3, 2, 0) and (pool.ceil_mode or isinstance(pool, MaxPool2dSame))
    if (k, s, p) in ((3, 2, 1), (2, 2, 0)) or own_site or centred_stride_1:
        if pool.dilation in (1, (1, 1)):
            return
    raise unsupported(pool, path, f"kernel {k}, stride {s}, padding {p}, dilation {pool.dilation}, "
                                  f"ceil_mode {pool.ceil_mode}")


def upsample_scale(upsample: nn.Upsample, path: str) -> int:
    """The factor of a nearest or bilinear upsampling by a power of two, the same on both axes. A
    nearest one (HRNet's fusion of coarser branches): each finer site copies the coarser one it lies
    in, within one patch. A bilinear one (``align_corners`` off: EfficientFormerV2's attention at
    stride 32) also reads the neighbouring coarser site, zero where it is hidden, as in dense
    masking, and clamps at the image's border as torch does. Anything else (sizes off the grid,
    corners aligned) is refused."""
    factor = upsample.scale_factor
    factors = set(factor) if isinstance(factor, tuple) else {factor}
    plain = upsample.mode == "nearest" or (upsample.mode == "bilinear" and not upsample.align_corners)
    if plain and upsample.size is None and len(factors) == 1:
        scale = factors.pop()
        if scale == int(scale) and int(scale) > 1 and int(scale) & (int(scale) - 1) == 0:
            return int(scale)
    raise unsupported(upsample, path, f"mode {upsample.mode!r}, scale factor {factor}, size {upsample.size}, "
                                      f"align_corners {upsample.align_corners} (only nearest or bilinear without "
                                      "aligned corners, by a power of two, keeps the mask's grid)")


def adaptive_pool_size(pool: nn.AdaptiveAvgPool2d, path: str) -> int:
    """The side of a square adaptive average pooling's output (PVT v2's 7x7 keys), which engines run
    where it is the image's grid of patches; a missing or non-square size is refused."""
    size = pool.output_size
    sides = set(size) if isinstance(size, tuple) else {size}
    if len(sides) == 1 and isinstance(next(iter(sides)), int):
        return sides.pop()
    raise unsupported(pool, path, f"output size {size} (only a square one, the image's grid of patches)")


def square(size: tuple[int, int], module: nn.Module, path: str) -> int:
    """The side of a square group of sites (an attention's window or grid); another shape is refused."""
    side, side_w = size
    if side != side_w:
        raise unsupported(module, path, f"groups of {tuple(size)} sites (not square)")
    return side


def transposed_geometry(conv: nn.ConvTranspose2d, path: str) -> tuple[int, int, int]:
    """(kernel, stride, padding) of a transposed convolution whose output is its input's sites times
    its stride (``kernel - 2 * padding == stride``: LowFormer's 4x4 at stride 2, padding 1, and 3x3
    at stride 1, padding 1), square, one group or depthwise; anything else is refused. Its windows
    reach into the neighbouring patches, where hidden sites give and take nothing."""
    (k, kw), (s, sw), (p, pw) = conv.kernel_size, conv.stride, conv.padding
    depthwise = conv.groups == conv.in_channels == conv.out_channels
    if ((k, s, p) == (kw, sw, pw) and k - 2 * p == s and conv.output_padding == (0, 0) and conv.dilation == (1, 1)
            and conv.padding_mode == "zeros" and (conv.groups == 1 or depthwise)):
        return k, s, p
    raise unsupported(conv, path, f"kernel {conv.kernel_size}, stride {conv.stride}, padding {conv.padding}, "
                                  f"output padding {conv.output_padding}, dilation {conv.dilation}, {conv.groups} "
                                  "groups (only square kernels of 2 * padding + stride, one group or depthwise, "
                                  "keep the mask's grid)")
