"""What a timm model family tells the shared encoder: its blocks, stem, stages and refusals.

Every engine builds its encoder by walking a timm model and swapping each leaf module
(convolution, norm, activation, pooling, drop-path, ...) for its own twin; the blocks and the
stage layout are mirrored by the family's classes and keep timm's module names, so weights map
one-to-one. A family module (families/resnet.py, families/convnext.py) defines a ``Family`` and its mirror
blocks.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import timm
import torch
from timm.layers import (Conv2dSame, ConvNormAct, GroupNorm, GroupNorm1, LayerNorm, LayerNorm2d, RmsNorm2d,
                         RmsNormAct2d, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame)
from timm.layers.fast_norm import rms_norm2d
from timm.layers.pool2d_same import MaxPool2dSame
from timm.layers import activations as timm_act
from timm.models.metaformer import GroupNorm1NoBias, LayerNorm2dNoBias, LayerNormNoBias
from timm.models.nfnet import GammaAct
from torch import nn

LeafConverter = Callable[[nn.Module, str], nn.Module]


class ConversionError(ValueError):
    """A module of the timm model has no equivalent in the target engine."""


def unsupported(module: nn.Module, path: str, why: str = "") -> ConversionError:
    detail = f": {why}" if why else ""
    return ConversionError(f"cannot convert {type(module).__name__} at '{path}'{detail}")


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


def _zero_pad(module: nn.Module) -> bool:
    return isinstance(module, nn.ConstantPad2d) and module.value == 0


def _zero_pads_fused(children: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """A Sequential's children with each zero pad before an unpadded max pooling or plain
    convolution folded into it (a ``ZeroPaddedMaxPool``, a ``ZeroPaddedConv2d``); the pad's place
    holds an Identity (neither holds tensors)."""
    children = list(children)
    for i in range(len(children) - 1):
        (pad_name, pad), (name, after) = children[i], children[i + 1]
        if not _zero_pad(pad):
            continue
        if type(after) is nn.MaxPool2d and after.padding in (0, (0, 0)):
            children[i], children[i + 1] = (pad_name, nn.Identity()), (name, ZeroPaddedMaxPool(pad, after))
        elif type(after) is nn.Conv2d and after.padding == (0, 0) and after.padding_mode == "zeros":
            children[i], children[i + 1] = (pad_name, nn.Identity()), (name, ZeroPaddedConv2d(pad, after))
    return children


class Converter:
    """Converts a timm subtree: blocks the family mirrors become their mirror classes,
    Sequentials keep their structure and child names (a zero pad before a max pooling becomes
    one ``ZeroPaddedMaxPool``), everything else goes to the engine's leaf conversion."""

    def __init__(self, leaf: LeafConverter, mirrors: dict[type, type]):
        self.leaf = leaf
        self.mirrors = mirrors
        # id -> (timm's module, kept so that no other takes its id; its conversion): a module timm
        # shares (CoaT's position encodings, one per stage in every block) is converted once, shared
        self.converted: dict[int, tuple[nn.Module, nn.Module]] = {}

    def __call__(self, module: nn.Module | None, path: str) -> nn.Module | None:
        if module is None:
            return None
        if id(module) in self.converted:
            return self.converted[id(module)][1]
        mirror = self.mirrors.get(type(module))
        if mirror is not None:
            out = mirror(module, self, path)
        elif type(module) is nn.Sequential:
            out = MirrorSequential(module, self, path)
        else:
            out = self.leaf(module, path)
        self.converted[id(module)] = (module, out)
        return out


class MirrorSequential(nn.Sequential):
    """A Sequential (or a timm subclass of one that runs its children in order, as byobnet's
    ``Stem``) with its children converted under their own names (``conv1``, ``pool``, or 0, 1, ...);
    a zero pad before a max pooling becomes one ``ZeroPaddedMaxPool``."""

    def __init__(self, module: nn.Sequential, convert: Converter, path: str):
        super().__init__(OrderedDict((name, convert(child, f"{path}.{name}"))
                                     for name, child in _zero_pads_fused(module.named_children())))


class MirrorChildren(nn.Module):
    """A mirror holding the timm module's children named in ``children_names``, each converted
    under its own name (None where the module has none); subclasses name them and run them, and
    name the module's ``dropouts``, refused where they drop."""

    children_names: tuple[str, ...] = ()
    dropouts: tuple[str, ...] = ()

    def __init__(self, module: nn.Module, convert: Converter, path: str):
        super().__init__()
        refuse_dropout(module, path, *self.dropouts)
        for name in self.children_names:
            setattr(self, name, convert(getattr(module, name, None), f"{path}.{name}"))


class MirrorInOrder(MirrorChildren):
    """A mirror whose forward runs its ``children_names`` one after the other (those the module
    lacks skipped): conv-norm pairs, a block's layers in a row, a stage's Sequential blocks."""

    def forward(self, x):
        for name in self.children_names:
            child = getattr(self, name)
            if child is not None:
                x = child(x)
        return x


class MirrorRunningConcat(nn.Module):
    """A container whose every child reads the concatenation of its input and all earlier
    children's outputs, and whose output is that concatenation with the last one's (DenseNet's
    DenseBlock, RDNet's DenseStage). One running concatenation holds what timm's ``torch.cat`` of
    the list makes at each child; children keep timm's names."""

    def __init__(self, module: nn.Module, convert: Converter, path: str):
        super().__init__()
        for name, child in module.named_children():
            self.add_module(name, convert(child, f"{path}.{name}"))
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat")  # parameter-free, a name timm's lacks

    def forward(self, x):
        for name, child in self.named_children():
            if name != "concat":
                x = self.concat(x, child(x))
        return x


class MirrorDownsampleBlocks(nn.Module):
    """A stage that is a ``downsample`` (an identity in the first) then its ``blocks`` in order
    (timm's ConvNeXtStage, MambaOutStage; Swin V2's, whose blocks are a ModuleList: mirrored as a
    Sequential of the same names)."""

    def __init__(self, stage: nn.Module, convert: Converter, path: str):
        super().__init__()
        self.downsample = convert(stage.downsample, f"{path}.downsample")
        blocks = stage.blocks
        self.blocks = convert(nn.Sequential(*blocks) if isinstance(blocks, nn.ModuleList) else blocks, f"{path}.blocks")

    def forward(self, x):
        return self.blocks(self.downsample(x))


class MirrorConvNormAct(nn.Module):
    """timm's ConvNormAct: convolution, then its norm with its activation (batch norm, or group
    norm in ``regnety_040_sgn``), then anti-aliasing where it has one (a leaf: a 2x2 average
    pooling or a blur pooling)."""

    def __init__(self, block: ConvNormAct, convert: Converter, path: str):
        super().__init__()
        self.conv = convert.leaf(block.conv, f"{path}.conv")
        self.bn = convert(block.bn, f"{path}.bn")
        aa = getattr(block, "aa", None)
        self.aa = None if aa is None else convert.leaf(aa, f"{path}.aa")

    def forward(self, x):
        x = self.bn(self.conv(x))
        return x if self.aa is None else self.aa(x)


# why no engine mirrors an optional sub-module of timm's blocks, by its attribute name
EXTRAS_REFUSED = {
    "drop_block": "DropBlock drops square regions of the whole map, hidden sites included; "
                  "set drop_block_rate to 0",
    "drop": "DropBlock drops square regions of the whole map, hidden sites included; set drop_block_rate to 0",
}


def reject_extras(block: nn.Module, path: str, names: tuple[str, ...]) -> None:
    """Refuse, by name, path and reason, optional sub-modules of a block that no engine mirrors."""
    for name in names:
        sub = getattr(block, name, None)
        if sub is not None and not isinstance(sub, nn.Identity):
            raise unsupported(sub, f"{path}.{name}", EXTRAS_REFUSED[name])


def refuse_dropout(module: nn.Module, path: str, *names: str) -> None:
    """Refuse ``module`` where any of its dropouts ``names`` (dotted paths below it) drops: its
    mirror runs without them (timm's default rate is 0). A ``nn.Dropout`` the converter meets as a
    leaf runs in every engine (``DROPOUTS``)."""
    for name in names:
        drop = module.get_submodule(name)
        if drop.p > 0:
            raise unsupported(drop, f"{path}.{name}", f"dropout p={drop.p}")


def refuse_checkpointing(module: nn.Module, path: str) -> None:
    """Refuse a module whose timm forward checkpoints (``grad_checkpointing``): no engine mirrors
    timm's re-run of its blocks in backward."""
    if getattr(module, "grad_checkpointing", False):
        raise unsupported(module, path, "gradient checkpointing is not mirrored; turn it off")


@dataclass(frozen=True)
class CheckpointingRefused:
    """A family's check: refuse gradient checkpointing wherever timm keeps its flag, on the model
    (reported at ``body``, what its forward checkpoints) or on each of ``body``'s stages."""

    body: str

    def __call__(self, model: nn.Module) -> None:
        refuse_checkpointing(model, self.body)
        for name, stage in getattr(model, self.body).named_children():
            refuse_checkpointing(stage, f"{self.body}.{name}")


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy whose parameters are buffers: it keeps tensors the encoder never runs (a classifier
    head's norm) so that exported weights load strictly into the timm model, without giving the
    optimiser or DistributedDataParallel parameters that never get a gradient."""
    module = copy.deepcopy(module)
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            delattr(sub, name)
            sub.register_buffer(name, param.detach())
    return module


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


def mirror_layer_scale(mirror: nn.Module, block: nn.Module, convert: Converter, path: str,
                       name: str = "gamma") -> None:
    """Give ``mirror`` the optional per-channel layer scale that ``block`` holds as its own
    parameter (timm's ``gamma``; FasterNet's ``layer_scale``): the parameter under timm's name and
    a ``scale`` leaf, both None where the block has none (``self.scale(x, self.<name>)`` applies it)."""
    gamma = getattr(block, name)
    setattr(mirror, name, None if gamma is None else nn.Parameter(gamma.detach().clone()))
    mirror.scale = None if gamma is None else convert.leaf(LayerScale(), f"{path}.{name}")


class MirrorLayerScale(nn.Module):
    """timm's LayerScale2d (and LayerScale, its channels-last twin; FastViT's own, a (C, 1, 1)
    ``gamma``): a learned per-channel scale, kept under timm's name and shape (``gamma``)."""

    def __init__(self, module: nn.Module, convert: Converter, path: str):
        super().__init__()
        self.gamma = nn.Parameter(module.gamma.detach().clone())
        self.scale = convert.leaf(LayerScale(), f"{path}.gamma")

    def forward(self, x):
        return self.scale(x, self.gamma.view(-1))


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


def no_check(model: nn.Module) -> None:
    """Families without refusals beyond those of their leaves and blocks."""


class Layout(NamedTuple):
    """How one timm model runs as an encoder. Paths are timm module paths."""

    stem: tuple[str, ...]  # run in order before the stages
    stages: tuple[tuple[str, ...], ...]  # one per scale (``Family.strides``), each run in order
    channels: tuple[int, ...]  # of each stage's output

    def top_level(self) -> list[str]:
        """The timm model's top-level modules the encoder converts, in order."""
        paths = self.stem + tuple(p for stage in self.stages for p in stage)
        return list(dict.fromkeys(p.split(".")[0] for p in paths))


# the stages' strides of most families; the last is the mask's patch size
STRIDES = (4, 8, 16, 32)
PATCH = STRIDES[-1]


def check_strides(model: nn.Module, reductions: list[int], strides: tuple[int, ...] = STRIDES) -> None:
    if tuple(reductions) != strides:
        raise ConversionError(f"{type(model).__name__}: stage strides {reductions} are not "
                              f"{', '.join(map(str, strides))} (dilated or output-stride models cannot be masked "
                              f"on a {PATCH}-pixel grid)")


# the mask's patch sizes a family's coarsest stride may set (NesT's 16; 64 would need inputs of its multiples)
PATCHES = (16, PATCH)


def check_scales(strides: tuple[int, ...]) -> None:
    """A family's scales feed SparK's decoder, whose blocks double the resolution from the mask's
    patch (the coarsest stride, 32 or 16) down: they must halve without a gap (4, 8, 16, 32;
    Visformer's 8, 16, 32; NesT's 4, 8, 16)."""
    if not strides or strides[-1] not in PATCHES or any(b != 2 * a for a, b in zip(strides, strides[1:])):
        raise ValueError(f"encoder strides {strides} must double from the finest to the mask's patch, "
                         f"{' or '.join(map(str, PATCHES))}")


@dataclass(frozen=True)
class NamedStages:
    """Named stage modules (timm's feature taps) at ``strides``; ``head`` (a final 1x1 convolution
    before pooling, say) runs after the last, which then has ``num_features`` channels."""

    stem: tuple[str, ...]
    stages: tuple[str, ...]
    head: tuple[str, ...] = ()
    strides: tuple[int, ...] = STRIDES

    def __call__(self, model: nn.Module) -> Layout:
        info = {i["module"]: i for i in model.feature_info}
        missing = [s for s in self.stages if s not in info]
        if missing:
            raise ConversionError(f"{type(model).__name__} reports no features for {missing}")
        check_strides(model, [info[s]["reduction"] for s in self.stages], self.strides)
        channels = [info[s]["num_chs"] for s in self.stages]
        if self.head:
            channels[-1] = model.num_features
        groups = tuple((s,) for s in self.stages[:-1]) + ((self.stages[-1], *self.head),)
        return Layout(self.stem, groups, tuple(channels))


@dataclass(frozen=True)
class BlockStages:
    """Models whose body is one Sequential (``blocks``: EfficientNet, MobileNetV3; ``features``:
    RexNet) of stages: a stage runs every block after the previous stage's tap up to timm's
    feature tap at its stride; blocks after the last tap, then ``head``, end the last stage,
    which then has ``num_features`` channels (what timm's ``forward_features`` returns)."""

    stem: tuple[str, ...]
    head: tuple[str, ...] = ()
    body: str = "blocks"

    def __call__(self, model: nn.Module) -> Layout:
        taps = {i["reduction"]: i for i in model.feature_info}  # the last tap at each stride
        check_strides(model, sorted(r for r in taps if r > 2))
        modules = [taps[r]["module"] for r in STRIDES]
        if not all(m.startswith(f"{self.body}.") for m in modules):
            raise ConversionError(f"{type(model).__name__}: feature taps {modules} are not in '{self.body}'")
        ends = [int(m.split(".")[1]) for m in modules]
        last = len(getattr(model, self.body)) - 1
        channels = [taps[r]["num_chs"] for r in STRIDES]
        if self.head or ends[-1] < last:
            channels[-1] = model.num_features
        ends[-1] = last  # blocks after the last tap keep its stride
        starts = [0] + [e + 1 for e in ends[:-1]]
        stages = [tuple(f"{self.body}.{i}" for i in range(a, e + 1)) for a, e in zip(starts, ends)]
        stages[-1] += self.head
        return Layout(self.stem, tuple(stages), tuple(channels))


@dataclass(frozen=True)
class TappedStages:
    """Models whose body is ``stem``, the Sequential ``stages`` and ``head`` (ByobNet's final 1x1
    convolution), run in that order (ByobNet, CspNet). A stage ends at timm's feature tap at
    its stride; what runs before the stride-4 stage (CSPDarkNet's stride-2 first stage, after a
    stride-1 stem) joins the stem, what runs after the stride-32 tap joins the last stage, which
    then has ``num_features`` channels."""

    head: tuple[str, ...] = ()

    def __call__(self, model: nn.Module) -> Layout:
        order = ["stem", *(f"stages.{i}" for i in range(len(model.stages))), *self.head]
        taps = {}  # reduction -> (position in order, channels) of the last top-level tap there
        for info in model.feature_info:
            if info["module"] in order:
                taps[info["reduction"]] = (order.index(info["module"]), info["num_chs"])
        check_strides(model, sorted(r for r in taps if r > 2))
        early = [taps[r][0] for r in taps if r < STRIDES[0]]
        ends = [max(early, default=0)] + [taps[r][0] for r in STRIDES]
        ends[-1] = len(order) - 1  # the head keeps the last stride
        channels = [taps[r][1] for r in STRIDES]
        if taps[STRIDES[-1]][0] < ends[-1]:  # a head timm does not tap (FastViT's final MobileOne block)
            channels[-1] = model.num_features
        stages = tuple(tuple(order[a + 1:e + 1]) for a, e in zip(ends, ends[1:]))
        return Layout(tuple(order[:ends[0] + 1]), stages, tuple(channels))


@dataclass(frozen=True)
class ChildStages:
    """Models whose body is one Sequential (``features``: VGG, DenseNet, DPN; ``dense_stages``:
    RDNet) with timm's feature taps among its children: the stem (``stem`` first, where the model
    has one apart) runs up to the last tap below stride 4, a stage from there up to its stride's
    tap; children after the stride-32 tap (DPN's final norm), then ``head`` (RDNet's ``norm_pre``),
    end the last stage, which then has ``num_features`` channels."""

    body: str = "features"
    stem: tuple[str, ...] = ()
    head: tuple[str, ...] = ()

    def __call__(self, model: nn.Module) -> Layout:
        order = [f"{self.body}.{name}" for name, _ in getattr(model, self.body).named_children()]
        taps = {i["reduction"]: i for i in model.feature_info}  # the last tap at each stride
        check_strides(model, sorted(r for r in taps if r > 2))
        ends = [max((order.index(taps[r]["module"]) for r in taps if r < STRIDES[0]), default=-1)]
        ends += [order.index(taps[r]["module"]) for r in STRIDES]
        channels = [taps[r]["num_chs"] for r in STRIDES]
        if ends[-1] < len(order) - 1:
            channels[-1] = model.num_features
        ends[-1] = len(order) - 1  # children after the last tap keep its stride
        stages = [tuple(order[a + 1:e + 1]) for a, e in zip(ends, ends[1:])]
        stages[-1] += self.head
        return Layout(self.stem + tuple(order[:ends[0] + 1]), tuple(stages), tuple(channels))


class StemPool(NamedTuple):
    """A stem that ends in an activation then a max pooling (top-level module names). An engine may
    pool first (they commute for ReLU), and hidden zeros never win the pooling after a ReLU."""

    act: str
    pool: str


@dataclass(frozen=True)
class InputSizes:
    """The input sizes a model's encoders run at: multiples of ``multiple``, up to ``largest`` (None:
    any), each limit with why it is there (a pretraining config off them fails before any work)."""

    multiple: int = PATCH  # the mask's patch: any whole number of patches
    why_multiple: str = ""
    largest: int | None = None
    why_largest: str = ""

    def refusal(self, model: str, size: int) -> str | None:
        """The one-line reason ``model`` cannot run at ``size``, or None where it can."""
        if self.largest == self.multiple and size != self.multiple:
            return f"model {model} {self.why_multiple}: input_size must be {self.multiple}, got {size}"
        if size % self.multiple:
            return f"model {model} {self.why_multiple}: input_size must be a multiple of {self.multiple}, got {size}"
        if self.largest is not None and size > self.largest:
            return f"model {model} {self.why_largest}: input_size must be at most {self.largest}, got {size}"
        return None

    def fit(self, size: int) -> int:
        """The least input size from ``size`` up that the model runs at (its own, where it has one)."""
        fitted = -(-size // self.multiple) * self.multiple
        return fitted if self.largest is None else min(fitted, self.largest)


def any_input_size(name: str) -> InputSizes:
    """A family whose models run at any whole number of patches."""
    return InputSizes()


def normed_stage_outputs(timm_class: type, stem: str, stages: str = "stages") -> Callable[[nn.Module, Any], list]:
    """``Family.features`` of a family whose features are its stages' outputs, the last through the
    final ``norm``: timm's ``forward_intermediates(norm=True)`` on a ``timm_class`` model (maps, not
    tokens), the same flow on the converted body (``stem``, ``stages``, ``norm``: timm's names)."""
    def features(net: nn.Module, x) -> list:
        if isinstance(net, timm_class):
            return net.forward_intermediates(x, norm=True, intermediates_only=True)
        x = getattr(net, stem)(x)
        feats = []
        for stage in getattr(net, stages):
            x = stage(x)
            feats.append(x)
        feats[-1] = net.norm(x)
        return feats
    return features


def meta_model(name: str) -> nn.Module:
    """timm's model ``name`` on the meta device: its modules and shapes, no weights made."""
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=0)


def input_shapes(model: nn.Module, modules: Sequence[nn.Module], size: int) -> list[tuple[nn.Module, torch.Size]]:
    """Each call of one of ``modules`` in a forward of the meta ``model`` at ``size`` px, with the
    shape of its first input (where its map's stride is read from the shapes alone)."""
    seen: list[tuple[nn.Module, torch.Size]] = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append((m, args[0].shape))) for m in modules]
    try:
        with torch.device("meta"):
            model(torch.empty(1, 3, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def own_input_size(why: str) -> Callable[[str], InputSizes]:
    """``Family.input_sizes`` of a family whose models run at their own input size alone (timm runs
    no other): ``why`` names what is made for it."""
    def sizes(name: str) -> InputSizes:
        size = timm.models.get_pretrained_cfg(name).input_size[-1]
        return InputSizes(size, why, largest=size)
    return sizes


@dataclass(frozen=True)
class Family:
    """A timm model family as the shared encoder sees it."""

    name: str
    timm_class: type[nn.Module]
    mirrors: dict[type, type]  # timm block/stage class -> mirror class
    layout: Callable[[nn.Module], Layout]  # stem and stages of one model of the family
    kept: tuple[str, ...] = ()  # modules or tensors that never run (frozen copies), if present
    check: Callable[[nn.Module], None] = no_check  # refusals before any conversion
    # timm modules no engine mirrors (their subclasses too), each with the reason its refusal gives
    refused: Mapping[type, str] = field(default_factory=dict)
    stem_pool: StemPool | None = None
    # mirror class -> its (norm, activation) leaves that run back to back: an engine may run each
    # pair as one operator (the sparse engine's batch norm + activation keeps fewer rows)
    norm_acts: Mapping[type, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    # mirror class -> its 1x1 conv-norm sub-modules without an activation (timm's ConvNormAct) whose
    # product an engine may make again in backward rather than keep (RepVGG's 1x1 branch, beside a
    # 3x3 that keeps the same input)
    pointwise_norms: Mapping[type, tuple[str, ...]] = field(default_factory=dict)
    # timm's maps are channels last between its modules (MambaOut); the engines' never are
    channels_last: bool = False
    # timm modules besides ``name`` whose models are this family's class (hardcorenas: MobileNetV3)
    other_modules: tuple[str, ...] = ()
    # timm classes besides ``timm_class`` of the same shape in the same module (EfficientVitLarge)
    other_classes: tuple[type[nn.Module], ...] = ()
    # where the stages are no chain of modules (HRNet's parallel branches): the family's own forward
    # from the input to the features, run on the converted body and the timm model alike (the
    # body keeps timm's names); the layout then only names the modules to convert
    features: Callable[[nn.Module, Any], list] | None = None
    # the input sizes the timm model of a name runs at, where some sizes are off limits (MaxViT's whole grids)
    input_sizes: Callable[[str], InputSizes] = any_input_size
    # the model's own parameters the family's ``features`` reads (Hiera's position embeddings), trainable
    # copies on the converted body under timm's names, if the model has them
    parameters: tuple[str, ...] = ()
    # the strides of the encoder's outputs, fine to coarse (the scales SparK's decoder can take)
    strides: tuple[int, ...] = STRIDES

    def __post_init__(self) -> None:
        check_scales(self.strides)

    @property
    def timm_classes(self) -> tuple[type[nn.Module], ...]:
        """The timm model classes of the family."""
        return (self.timm_class, *self.other_classes)

    @property
    def timm_modules(self) -> tuple[str, ...]:
        """The timm modules whose models are this family's class (its refusals still apply)."""
        return (self.name, *self.other_modules)

    def convert(self, model: nn.Module, leaf: LeafConverter, layout: Layout) -> nn.ModuleDict:
        """Stem and stages with leaves converted (plus the kept modules); names match timm's."""
        self.check(model)
        for path, module in model.named_modules():
            why = next((why for cls, why in self.refused.items() if isinstance(module, cls)), None)
            if why is not None:
                raise unsupported(module, path, why)
        convert = Converter(leaf, self.mirrors)
        body = nn.ModuleDict({name: convert(getattr(model, name), name) for name in layout.top_level()})
        for name in self.parameters:
            if getattr(model, name, None) is not None:
                body.register_parameter(name, nn.Parameter(getattr(model, name).detach().clone()))
        for path in self.kept:
            *parents, name = path.split(".")
            try:
                parent = model.get_submodule(".".join(parents))
            except AttributeError:
                continue
            item = getattr(parent, name, None)
            if not isinstance(item, (nn.Module, torch.Tensor)):  # e.g. a head without a norm
                continue
            holder = body
            for parent_name in parents:
                if parent_name not in holder._modules:
                    holder.add_module(parent_name, nn.Module())
                holder = holder._modules[parent_name]
            if isinstance(item, nn.Module):
                holder.add_module(name, frozen_copy(item))
            else:  # a tensor a module holds itself (an attention pool's position embedding)
                holder.register_buffer(name, item.detach().clone())
        return body

    @torch.no_grad()
    def plain_features(self, model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
        """The stage outputs of the ordinary (unmasked) timm model, for comparison."""
        if self.features is not None:
            return self.features(model, images)
        layout = self.layout(model)
        x = images
        for path in layout.stem:
            x = model.get_submodule(path)(x)
        feats = []
        for stage in layout.stages:
            for path in stage:
                x = model.get_submodule(path)(x)
            feats.append(x.permute(0, 3, 1, 2) if self.channels_last else x)
        return feats
