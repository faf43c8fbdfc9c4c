"""The ByobNet family (timm ``byobnet``: RepVGG, MobileOne, GENet, the ``resnet*ts``/``*resnext26ts``
nets, byobnet's RegNetZ, CLIP's ResNets; and timm's ``mobilevit`` models, ByobNets whose MobileViT
blocks mobilevit.py mirrors, and its ``byoanet`` BotNets, HaloNets and Lambda-ResNets, whose
attention and lambda layers byoanet.py mirrors).

"Bring your own blocks": a stem (one conv-norm-act, a ``Stem`` of them with an optional pooling,
or a RepVGG/MobileOne block), stages of declared blocks, and an optional final 1x1 convolution
that ends the stride-32 features. Residual blocks (basic, bottleneck, dark, edge) run their
sub-modules in order, plus a shortcut. RepVGG and MobileOne blocks are re-parameterisable: at
train time, when SparK runs, they sum parallel conv+norm branches (k x k, 1x1, an identity
norm) over the same visible sites; a re-parameterised block is one convolution with a bias.
Non-local attention is refused by path.
"""

from __future__ import annotations

import timm
from timm.layers import ConvNormAct
from timm.layers.non_local_attn import BatNonLocalAttn
from timm.models.byobnet import (BasicBlock, BottleneckBlock, ByobNet, DarkBlock, DownsampleAvg, EdgeBlock,
                                 MobileOneBlock, RepVggBlock, SelfAttnBlock, Stem)
from torch import nn

from . import byoanet, mobilevit
from ..family import Family, InputSizes
from ..layouts import TappedStages
from ..mirrors import Converter, MirrorConvNormAct, MirrorSequential
from ..refusals import CheckpointingRefused

# each residual block's sub-modules in the order its forward runs them (before drop path, the
# shortcut and the activation)
ORDER = {
    BasicBlock: ("conv1_kxk", "attn", "conv2_kxk", "attn_last"),
    BottleneckBlock: ("conv1_1x1", "conv2_kxk", "conv2b_kxk", "attn", "conv3_1x1", "attn_last"),
    DarkBlock: ("conv1_1x1", "attn", "conv2_kxk", "attn_last"),
    EdgeBlock: ("conv1_kxk", "attn", "conv2_1x1", "attn_last"),
    SelfAttnBlock: ("conv1_1x1", "conv2_kxk", "self_attn", "post_attn", "conv3_1x1"),  # BotNet's (byoanet.py)
}


class MirrorByoBlock(nn.Module):
    """byobnet's basic, bottleneck, dark and edge blocks: sub-modules in order, drop path, + the
    shortcut (an identity, a 1x1 conv-norm, an avg-down; none where timm's is None), act."""

    def __init__(self, block: nn.Module, convert: Converter, path: str):
        super().__init__()
        self.order = ORDER[type(block)]
        for name in self.order + ("shortcut", "drop_path", "act"):
            self.add_module(name, convert(getattr(block, name), f"{path}.{name}"))

    def forward(self, x):
        shortcut = x
        for name in self.order:
            x = getattr(self, name)(x)
        x = self.drop_path(x)
        if self.shortcut is not None:
            x = x + self.shortcut(shortcut)
        return self.act(x)


def _convert_branches(mirror: nn.Module, block: nn.Module, convert: Converter, path: str,
                      names: tuple[str, ...]) -> None:
    """The block's sub-modules by name (None where timm's block has none: e.g. no identity branch
    in a strided block, or none of the branches once re-parameterised)."""
    for name in names + ("reparam_conv", "attn", "act"):
        mirror.add_module(name, convert(getattr(block, name, None), f"{path}.{name}"))


class MirrorRepVggBlock(nn.Module):
    """RepVGG: k x k conv-norm + 1x1 conv-norm (both strided alike: the 1x1 keeps exactly the
    coarser visible sites) [+ an identity norm], then attention and activation."""

    def __init__(self, block: RepVggBlock, convert: Converter, path: str):
        super().__init__()
        _convert_branches(self, block, convert, path, ("identity", "conv_kxk", "conv_1x1", "drop_path"))

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.act(self.attn(self.reparam_conv(x)))
        y = self.conv_1x1(x) + self.conv_kxk(x)
        if self.identity is not None:
            y = self.drop_path(y) + self.identity(x)
        return self.act(self.attn(y))


class MirrorMobileOneBlock(nn.Module):
    """MobileOne: a 1x1 "scale" conv-norm (for k > 1) + k x k conv-norm branches, drop path,
    [+ an identity norm], then attention and activation."""

    def __init__(self, block: MobileOneBlock, convert: Converter, path: str):
        super().__init__()
        _convert_branches(self, block, convert, path, ("identity", "conv_scale", "drop_path"))
        branches = getattr(block, "conv_kxk", None)
        self.conv_kxk = None if branches is None else nn.ModuleList(
            [convert(b, f"{path}.conv_kxk.{i}") for i, b in enumerate(branches)])

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.act(self.attn(self.reparam_conv(x)))
        branches = [self.conv_scale] if self.conv_scale is not None else []
        y = None
        for branch in branches + list(self.conv_kxk):
            y = branch(x) if y is None else y + branch(x)
        y = self.drop_path(y)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(self.attn(y))


class MirrorDownsampleAvg(nn.Module):
    """The avg-down shortcut: 2x2 average pooling (mask-aligned windows, all visible or all
    hidden), then a 1x1 conv-norm."""

    def __init__(self, block: DownsampleAvg, convert: Converter, path: str):
        super().__init__()
        self.pool = convert(block.pool, f"{path}.pool")
        self.conv = convert(block.conv, f"{path}.conv")

    def forward(self, x):
        return self.conv(self.pool(x))


# modules with no exact sparse twin, and why (refused by path before any conversion)
REFUSED = {
    BatNonLocalAttn: "non-local attention mixes every site of the map",
}


def input_sizes(name: str) -> InputSizes:
    """MobileViT's, BotNet's and HaloNet's limits (their modules'); the other ByobNets run at any
    whole number of patches."""
    for module, sizes in (("mobilevit", mobilevit.input_sizes), ("byoanet", byoanet.input_sizes)):
        if timm.models.is_model_in_modules(name, [module]):
            return sizes(name)
    return InputSizes()


BYOBNET = Family(
    name="byobnet",
    timm_class=ByobNet,
    mirrors={**{block: MirrorByoBlock for block in ORDER}, RepVggBlock: MirrorRepVggBlock,
             MobileOneBlock: MirrorMobileOneBlock, DownsampleAvg: MirrorDownsampleAvg,
             ConvNormAct: MirrorConvNormAct, Stem: MirrorSequential, **mobilevit.MIRRORS, **byoanet.MIRRORS},
    layout=TappedStages(head=("final_conv",)),
    # what a head without its classifier holds: an attention pool's (CLIP) or an MLP head's weights
    kept=("head.pos_embed", "head.cls_token", "head.q", "head.k", "head.v", "head.qkv", "head.norm", "head.pre_logits"),
    check=CheckpointingRefused("stages"),
    refused=REFUSED,
    pointwise_norms={MirrorRepVggBlock: ("conv_1x1",)},
    other_modules=("mobilevit", "byoanet"),
    input_sizes=input_sizes,
)
