"""The ResNetV2 family (timm ``ResNetV2``: pre-activation ResNets, with batch norm or, as BiT,
with GroupNorm and weight-standardised convolutions).

A pre-activation block runs norm (with its activation) before each convolution; the first
norm's output feeds both the residual branch and, where the block changes width or stride, the
projection shortcut (a 1x1 convolution, after a 2x2 average pooling in the "d" models); without
one the shortcut is the block's input itself. The stem is a 7x7 (or a deep 3x3 stack), then a
max pooling (BiT: after a zero pad, with no activation before it: see ``ZeroPaddedMaxPool``).
timm's ``forward_features`` ends with the model's final ``norm`` (with its activation): that
normalised map is what the head pools, so it ends the last stage here, and exported weights load
strictly into ``timm.create_model(name, num_classes=0)``. GroupNorm takes each image's statistics
over its visible sites in both engines. Non-pre-activation ``Bottleneck`` blocks (``preact=False``)
are mirrored as well.
"""

from __future__ import annotations

from timm.layers import EvoNorm2dB0, FilterResponseNormAct2d
from timm.models.resnetv2 import (Bottleneck, DownsampleAvg, DownsampleConv, PreActBasic, PreActBottleneck,
                                  ResNetStage, ResNetV2)
from torch import nn

from ..family import Family
from ..layouts import NamedStages
from ..mirrors import Converter, MirrorChildren
from ..refusals import refuse_checkpointing


class MirrorDownsample(nn.Module):
    """timm's DownsampleConv (1x1 convolution that may stride, norm) and DownsampleAvg (2x2
    average pooling, 1x1 convolution, norm); the norm is an Identity in pre-activation blocks."""

    def __init__(self, block: nn.Module, convert: Converter, path: str):
        super().__init__()
        self.pool = convert(getattr(block, "pool", None), f"{path}.pool")  # DownsampleAvg's
        self.conv = convert(block.conv, f"{path}.conv")
        self.norm = convert(block.norm, f"{path}.norm")

    def forward(self, x):
        if self.pool is not None:
            x = self.pool(x)
        return self.norm(self.conv(x))


class _MirrorBlock(MirrorChildren):
    def __init__(self, block: nn.Module, convert: Converter, path: str):
        super().__init__(block, convert, path)
        self.downsample = convert(block.downsample, f"{path}.downsample")
        self.drop_path = convert(block.drop_path, f"{path}.drop_path")


class MirrorPreActBasic(_MirrorBlock):
    """timm's PreActBasic: norm1, then 3x3 (may stride), norm2, 3x3; + the shortcut."""

    children_names = ("norm1", "conv1", "norm2", "conv2")

    def forward(self, x):
        x_preact = self.norm1(x)
        shortcut = x if self.downsample is None else self.downsample(x_preact)
        x = self.conv2(self.norm2(self.conv1(x_preact)))
        return self.drop_path(x) + shortcut


class MirrorPreActBottleneck(_MirrorBlock):
    """timm's PreActBottleneck: norm1, 1x1, norm2, 3x3 (may stride), norm3, 1x1; + the shortcut."""

    children_names = ("norm1", "conv1", "norm2", "conv2", "norm3", "conv3")

    def forward(self, x):
        x_preact = self.norm1(x)
        shortcut = x if self.downsample is None else self.downsample(x_preact)
        x = self.conv3(self.norm3(self.conv2(self.norm2(self.conv1(x_preact)))))
        return self.drop_path(x) + shortcut


class MirrorBottleneck(_MirrorBlock):
    """timm's ResNetV2 Bottleneck without pre-activation: conv-norm three times, + shortcut, act."""

    children_names = ("conv1", "norm1", "conv2", "norm2", "conv3", "norm3", "act3")

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm3(self.conv3(self.norm2(self.conv2(self.norm1(self.conv1(x))))))
        return self.act3(self.drop_path(x) + shortcut)


class MirrorResNetStage(nn.Module):
    """timm's ResNetStage: its ``blocks`` in order."""

    def __init__(self, stage: ResNetStage, convert: Converter, path: str):
        super().__init__()
        self.blocks = convert(stage.blocks, f"{path}.blocks")

    def forward(self, x):
        return self.blocks(x)


# normalisations with no twin over visible sites (EvoNorm-S0/S0a and the filter response norm with its
# threshold have them: sparse/image_norms.py)
UNMIRRORED_NORMS = (EvoNorm2dB0, FilterResponseNormAct2d)
UNMIRRORED_WHY = ("EvoNorm-B0 (batch statistics and a running variance) and the filter response norm with a "
                  "separate activation are not mirrored; use the batch-norm, GroupNorm, EvoNorm-S0 or FRN-TLU models")


def _check(model: nn.Module) -> None:
    for name, stage in model.stages.named_children():
        refuse_checkpointing(stage, f"stages.{name}")


RESNETV2 = Family(
    name="resnetv2",
    timm_class=ResNetV2,
    mirrors={ResNetStage: MirrorResNetStage, PreActBasic: MirrorPreActBasic,
             PreActBottleneck: MirrorPreActBottleneck, Bottleneck: MirrorBottleneck,
             DownsampleConv: MirrorDownsample, DownsampleAvg: MirrorDownsample},
    # the final norm (and activation) of forward_features ends the last stage
    layout=NamedStages(("stem",), ("stages.0", "stages.1", "stages.2", "stages.3"), head=("norm",)),
    check=_check,
    refused=dict.fromkeys(UNMIRRORED_NORMS, UNMIRRORED_WHY),
)
