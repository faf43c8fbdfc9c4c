"""How a family mirrors timm's blocks: the ``Converter`` walks a timm subtree, turning each block
the family mirrors into its mirror class and every other module into the engine's leaf; the mirror
containers several families share (Sequentials, children run in order, running concatenations,
downsample-then-blocks stages, conv-norm-act) keep timm's module names, so weights map one-to-one."""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Callable

from timm.layers import ConvNormAct
from torch import nn

from .leaves import ChannelConcat, LayerScale, ZeroPaddedConv2d, ZeroPaddedMaxPool
from .refusals import refuse_dropout


LeafConverter = Callable[[nn.Module, str], nn.Module]


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
