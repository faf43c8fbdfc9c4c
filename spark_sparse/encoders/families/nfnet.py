"""The NormFreeNet family (timm ``NormFreeNet``: NFNet-F, NFNet-L / ECA-NFNet-L, NF-RegNet, NF-ResNet).

No norm anywhere: each convolution's kernel is standardised per output channel and scaled by a
learned gain (``ScaledStdConv2d``, a weight-only operation every engine runs at each forward),
and the residual branches are scaled by constants instead. A block is pre-activation: its
input, activated and scaled by ``beta``, feeds the 1x1 -> 3x3 (grouped, may stride; NFNet-F has a
second 3x3) -> 1x1 branch (squeeze-excitation or ECA after the 3x3 or after the last 1x1, scaled
by ``attn_gain``) and, where the block changes width or stride, the shortcut (2x2 average
pooling, 1x1 convolution); the branch is scaled by a learned skip-init gain (DeepMind's ports),
then by ``alpha``, and added to the shortcut. Without batch norm an image's features never
depend on the others in either mode. timm's ``forward_features`` ends with ``final_conv``
(NF-RegNet and NFNet-L: a 1x1 to the head's width) and ``final_act``: they end the last stage here.
"""

from __future__ import annotations

from timm.models.nfnet import DownsampleAvg, GammaAct, NormFreeBlock, NormFreeNet
from torch import nn

from .byobnet import MirrorDownsampleAvg  # the same shortcut: 2x2 average pooling, then a 1x1 convolution
from ..family import Family
from ..layouts import STRIDES, Layout
from ..leaves import LayerScale, Scale
from ..mirrors import Converter, MirrorChildren
from ..refusals import ConversionError, refuse_checkpointing, unsupported

# GammaAct's activations that keep zero at zero (the engines run it on visible sites only)
ZERO_KEEPING_ACTS = {"relu", "relu6", "leaky_relu", "silu", "swish", "gelu", "elu", "celu", "selu", "tanh",
                     "mish", "identity"}


class MirrorNormFreeBlock(MirrorChildren):
    """timm's NormFreeBlock, its scalings as ``Scale`` leaves (they hold no tensors)."""

    children_names = ("act1", "conv1", "act2", "conv2", "act2b", "conv2b", "attn", "act3", "conv3", "attn_last",
                      "drop_path", "downsample")

    def __init__(self, block: NormFreeBlock, convert: Converter, path: str):
        super().__init__(block, convert, path)
        # the skip-init gain (DeepMind's ports): a learned scalar on the branch, under timm's name
        self.skipinit_gain = None if block.skipinit_gain is None else nn.Parameter(block.skipinit_gain.detach().clone())
        self.skipinit = None if block.skipinit_gain is None else convert.leaf(LayerScale(), f"{path}.skipinit_gain")
        self.beta = convert(Scale(block.beta), f"{path}.beta")
        self.alpha = convert(Scale(block.alpha), f"{path}.alpha")
        self.attn_gain = convert(Scale(block.attn_gain), f"{path}.attn_gain")

    def forward(self, x):
        out = self.beta(self.act1(x))
        shortcut = x if self.downsample is None else self.downsample(out)
        out = self.conv2(self.act2(self.conv1(out)))
        if self.conv2b is not None:
            out = self.conv2b(self.act2b(out))
        if self.attn is not None:
            out = self.attn_gain(self.attn(out))
        out = self.conv3(self.act3(out))
        if self.attn_last is not None:
            out = self.attn_gain(self.attn_last(out))
        out = self.drop_path(out)
        if self.skipinit is not None:
            out = self.skipinit(out, self.skipinit_gain)
        return self.alpha(out) + shortcut


def _layout(model: NormFreeNet) -> Layout:
    """The stem, the four stages (the last with ``final_conv`` and ``final_act``)."""
    stages = [f"stages.{i}" for i in range(len(model.stages))]
    taps = {i["module"]: i for i in model.feature_info}
    # timm's last tap is final_conv where the model has one (NF-RegNet, NFNet-L)
    last = "final_conv" if "final_conv" in taps else stages[-1]
    reductions = [taps[s]["reduction"] for s in stages[:-1] if s in taps] + [taps[last]["reduction"]]
    if len(stages) != 4 or tuple(reductions) != STRIDES:
        raise ConversionError(f"NormFreeNet: {len(stages)} stages at strides {reductions}, not four at 4, 8, 16, 32 "
                              "(dilated or output-stride models cannot be masked on a 32-pixel grid)")
    channels = [taps[s]["num_chs"] for s in stages[:-1]] + [model.num_features]
    groups = tuple((s,) for s in stages[:-1]) + ((stages[-1], "final_conv", "final_act"),)
    return Layout(("stem",), groups, tuple(channels))


def _check(model: NormFreeNet) -> None:
    refuse_checkpointing(model, "stages")
    for path, module in model.named_modules():
        if isinstance(module, GammaAct):
            name = getattr(module.act_fn, "__name__", repr(module.act_fn))
            if name.removesuffix("_") not in ZERO_KEEPING_ACTS:
                raise unsupported(module, path, f"activation '{name}' does not keep zero at zero")


NFNET = Family(
    name="nfnet",
    timm_class=NormFreeNet,
    mirrors={NormFreeBlock: MirrorNormFreeBlock, DownsampleAvg: MirrorDownsampleAvg},
    layout=_layout,
    check=_check,
)
