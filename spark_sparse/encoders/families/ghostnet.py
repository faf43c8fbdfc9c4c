"""The GhostNet family (timm ``GhostNet``: ``ghostnet_050/100/130``, ``ghostnetv2_*``, ``ghostnetv3_*``).

A ghost module makes half its channels with a 1x1 convolution and the other half cheaply from
those, by a depthwise 3x3 (each with batch norm and, in the first module of a bottleneck, ReLU),
side by side. A ghost bottleneck is ghost module,
[depthwise strided conv + norm], [SE], ghost module, + its input (or a depthwise strided conv,
norm, 1x1, norm of it where width or stride change). The last stage ends with timm's 1x1
conv-bn-act (run before pooling). Version 2's first ghost modules from the third bottleneck on
multiply their output by a DFC attention gate made from their input (dfc.py). Version 3's
modules are re-parameterisable: at train time the 1x1 is three 1x1 conv-norms summed, the
depthwise 3x3 three depthwise conv-norms plus a depthwise 1x1 conv-norm and a norm of its input,
a bottleneck's strided depthwise three conv-norms plus a strided 1x1 one, all over the same
sites; re-parameterised (timm's ``reparameterize``), one convolution with a bias each. Both forms
convert; V3's modules from the third bottleneck on have V2's gate.
"""

from __future__ import annotations

from functools import reduce
from operator import add

from timm.models._efficientnet_blocks import ConvBnAct
from timm.models.ghostnet import GhostBottleneck, GhostBottleneckV3, GhostModule, GhostModuleV2, GhostModuleV3, GhostNet
from torch import nn

from .dfc import DfcGate
from .efficientnet import MirrorEfficientBlock
from ..family import Family
from ..layouts import BlockStages
from ..leaves import ChannelConcat
from ..mirrors import Converter, MirrorChildren
from ..refusals import CheckpointingRefused, unsupported


class MirrorGhostModule(nn.Module):
    """timm's GhostModule: primary (1x1) and cheap (depthwise 3x3 of the primary) side by side.
    (timm cuts them to ``out_chs``, which its GhostNets' widths, multiples of 4, never need.)"""

    def __init__(self, module: GhostModule, convert: Converter, path: str):
        super().__init__()
        made = module.primary_conv[0].out_channels + module.cheap_operation[0].out_channels
        if made != module.out_chs:
            raise unsupported(module, path, f"{made} channels cut to {module.out_chs} are not mirrored")
        self.primary_conv = convert(module.primary_conv, f"{path}.primary_conv")
        self.cheap_operation = convert(module.cheap_operation, f"{path}.cheap_operation")
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat")  # parameter-free, a name timm's lacks

    def forward(self, x):
        x1 = self.primary_conv(x)
        return self.concat(x1, self.cheap_operation(x1))


class MirrorGhostBottleneck(MirrorChildren):
    children_names = ("ghost1", "conv_dw", "bn_dw", "se", "ghost2", "shortcut")

    def forward(self, x):
        y = self.ghost1(x)
        if self.conv_dw is not None:
            y = self.bn_dw(self.conv_dw(y))
        if self.se is not None:
            y = self.se(y)
        return self.ghost2(y) + self.shortcut(x)


class MirrorGhostModuleV2(MirrorGhostModule):
    """V2's ghost module: V1's, times the DFC attention gate made from its input (``short_conv``)."""

    def __init__(self, module: GhostModuleV2, convert: Converter, path: str):
        super().__init__(module, convert, path)
        self.short_conv = convert.leaf(DfcGate(module.short_conv), f"{path}.short_conv")

    def forward(self, x):
        return self.short_conv(x, super().forward(x))


def trainable(mirror: nn.Module) -> None:
    """timm's re-parameterisation of a V3 module or bottleneck detaches all its parameters (SE's
    too); the encoder trains them."""
    for parameter in mirror.parameters():
        parameter.requires_grad_(True)


def _branches(convert: Converter, modules, path: str) -> nn.ModuleList:
    return nn.ModuleList(convert(m, f"{path}.{i}") for i, m in enumerate(modules))


class MirrorGhostModuleV3(nn.Module):
    """V3's ghost module, in either form: the primary 1x1 and the cheap depthwise operation side by
    side, each the sum of its conv-norm branches (and the cheap one's norm of its input) then the
    activation, or each one convolution; times V2's gate in ``shortcut`` mode."""

    def __init__(self, module: GhostModuleV3, convert: Converter, path: str):
        super().__init__()
        self.infer_mode = module.infer_mode
        if self.infer_mode:
            self.primary_conv = convert(module.primary_conv, f"{path}.primary_conv")
            self.cheap_operation = convert(module.cheap_operation, f"{path}.cheap_operation")
            made = module.primary_conv[0].out_channels + module.cheap_operation[0].out_channels
        else:
            for name in ("primary_rpr_skip", "primary_rpr_scale"):
                if getattr(module, name) is not None:
                    raise unsupported(module, path, f"a {name} branch (none in timm's GhostNetV3) is not mirrored")
            self.primary_rpr_conv = _branches(convert, module.primary_rpr_conv, f"{path}.primary_rpr_conv")
            self.primary_activation = convert.leaf(module.primary_activation, f"{path}.primary_activation")
            self.cheap_rpr_skip = convert.leaf(module.cheap_rpr_skip, f"{path}.cheap_rpr_skip")
            self.cheap_rpr_conv = _branches(convert, module.cheap_rpr_conv, f"{path}.cheap_rpr_conv")
            self.cheap_rpr_scale = convert(module.cheap_rpr_scale, f"{path}.cheap_rpr_scale")
            self.cheap_activation = convert.leaf(module.cheap_activation, f"{path}.cheap_activation")
            made = module.primary_rpr_conv[0].conv.out_channels + module.cheap_rpr_scale.conv.out_channels
        if made != module.out_chs:
            raise unsupported(module, path, f"{made} channels cut to {module.out_chs} are not mirrored")
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat")  # parameter-free, a name timm's lacks
        self.short_conv = (convert.leaf(DfcGate(module.short_conv), f"{path}.short_conv")
                           if module.mode == "shortcut" else None)
        if self.infer_mode:
            trainable(self)

    def forward(self, x):
        if self.infer_mode:
            x1 = self.primary_conv(x)
            x2 = self.cheap_operation(x1)
        else:
            x1 = self.primary_activation(reduce(add, (conv(x) for conv in self.primary_rpr_conv)))
            x2 = reduce(add, (conv(x1) for conv in self.cheap_rpr_conv),
                        self.cheap_rpr_scale(x1) + self.cheap_rpr_skip(x1))
            x2 = self.cheap_activation(x2)
        out = self.concat(x1, x2)
        return out if self.short_conv is None else self.short_conv(x, out)


class MirrorGhostBottleneckV3(nn.Module):
    """V3's bottleneck: ghost module, [the strided depthwise: its 1x1 branch plus its conv-norm
    branches, or one convolution], [SE], ghost module, + its input (or V1's depthwise shortcut)."""

    def __init__(self, block: GhostBottleneckV3, convert: Converter, path: str):
        super().__init__()
        self.ghost1 = convert(block.ghost1, f"{path}.ghost1")
        self.strided, self.infer_mode = block.stride > 1, block.infer_mode
        if self.strided and self.infer_mode:
            self.conv_dw = convert(block.conv_dw, f"{path}.conv_dw")
        elif self.strided:
            if block.dw_rpr_skip is not None:
                raise unsupported(block, path, "a dw_rpr_skip branch (none in timm's GhostNetV3) is not mirrored")
            self.dw_rpr_conv = _branches(convert, block.dw_rpr_conv, f"{path}.dw_rpr_conv")
            self.dw_rpr_scale = convert(block.dw_rpr_scale, f"{path}.dw_rpr_scale")
        self.se = convert(block.se, f"{path}.se")
        self.ghost2 = convert(block.ghost2, f"{path}.ghost2")
        self.shortcut = convert(block.shortcut, f"{path}.shortcut")
        if self.infer_mode:
            trainable(self)

    def forward(self, x):
        y = self.ghost1(x)
        if self.strided and self.infer_mode:
            y = self.conv_dw(y)
        elif self.strided:
            y = reduce(add, (conv(y) for conv in self.dw_rpr_conv), self.dw_rpr_scale(y))
        return self.ghost2(self.se(y)) + self.shortcut(x)


GHOSTNET = Family(
    name="ghostnet",
    timm_class=GhostNet,
    mirrors={GhostModule: MirrorGhostModule, GhostBottleneck: MirrorGhostBottleneck, ConvBnAct: MirrorEfficientBlock,
             GhostModuleV2: MirrorGhostModuleV2, GhostModuleV3: MirrorGhostModuleV3,
             GhostBottleneckV3: MirrorGhostBottleneckV3},
    layout=BlockStages(("conv_stem", "bn1", "act1")),
    kept=("conv_head",),  # a 1x1 convolution after pooling, kept (frozen, never run) for strict loading
    check=CheckpointingRefused("blocks"),
)
