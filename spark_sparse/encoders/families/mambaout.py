"""The MambaOut family (timm ``MambaOut``: MambaOut-Femto .. Base and the ``_rw`` variants).

MambaOut is a Mamba block without its state-space model: a gated CNN block, layer norm ->
fc1 -> split into a gate, an identity part and a part for a depthwise 7x7 convolution -> the gate's
activation times the other two side by side -> fc2 -> layer scale -> drop path, plus its input.
The stem is two 3x3 stride-2 convolutions (layer norm and activation between, a layer norm
after); each later stage begins with a 3x3 stride-2 convolution and a layer norm (before it in
the ``_rw`` variants). timm keeps every map channels last; the engines hold rows (sparse) or
channels-first masked maps, so the permutes have nothing to mirror. The classifier head's norm
and MLP run after pooling and are kept (frozen, never run) for strict loading.
"""

from __future__ import annotations

from timm.layers import LayerScale
from timm.models.mambaout import Downsample, DownsampleNormFirst, GatedConvBlock, MambaOut, MambaOutStage, Stem
from torch import nn

from ..family import Family
from ..layouts import NamedStages
from ..leaves import ChannelConcat, ChannelSplit, Product
from ..mirrors import Converter, MirrorChildren, MirrorDownsampleBlocks, MirrorLayerScale
from ..refusals import CheckpointingRefused


class MirrorStem(MirrorChildren):
    """conv1 (stride 2), [norm1], act, conv2 (stride 2), norm2."""

    children_names = ("conv1", "norm1", "act", "conv2", "norm2")

    def forward(self, x):
        x = self.conv1(x)
        if self.norm1 is not None:
            x = self.norm1(x)
        return self.norm2(self.conv2(self.act(x)))


class MirrorDownsample(nn.Module):
    """A 3x3 stride-2 convolution and a layer norm, in timm's order (norm first in the _rw ones)."""

    def __init__(self, down: Downsample | DownsampleNormFirst, convert: Converter, path: str):
        super().__init__()
        self.norm_first = isinstance(down, DownsampleNormFirst)
        self.conv = convert.leaf(down.conv, f"{path}.conv")
        self.norm = convert.leaf(down.norm, f"{path}.norm")

    def forward(self, x):
        return self.conv(self.norm(x)) if self.norm_first else self.norm(self.conv(x))


class MirrorGatedConvBlock(nn.Module):
    """timm's GatedConvBlock: the fc1 output split three ways (gate, identity, convolved)."""

    def __init__(self, block: GatedConvBlock, convert: Converter, path: str):
        super().__init__()
        gate, kept, _ = block.split_indices
        for name in ("norm", "fc1", "act", "conv", "fc2"):
            setattr(self, name, convert.leaf(getattr(block, name), f"{path}.{name}"))
        self.ls = convert(block.ls, f"{path}.ls")
        self.drop_path = convert.leaf(block.drop_path, f"{path}.drop_path")
        # parameter-free leaves under names timm's block does not use
        self.split_gate = convert.leaf(ChannelSplit(gate), f"{path}.split_gate")
        self.split_conv = convert.leaf(ChannelSplit(kept), f"{path}.split_conv")
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat")
        self.gated = convert.leaf(Product(), f"{path}.gated")

    def forward(self, x):
        g, rest = self.split_gate(self.fc1(self.norm(x)))
        i, c = self.split_conv(rest)
        y = self.fc2(self.gated(self.act(g), self.concat(i, self.conv(c))))
        return self.drop_path(self.ls(y)) + x


MAMBAOUT = Family(
    name="mambaout",
    timm_class=MambaOut,
    mirrors={Stem: MirrorStem, Downsample: MirrorDownsample, DownsampleNormFirst: MirrorDownsample,
             GatedConvBlock: MirrorGatedConvBlock, MambaOutStage: MirrorDownsampleBlocks, LayerScale: MirrorLayerScale},
    layout=NamedStages(("stem",), ("stages.0", "stages.1", "stages.2", "stages.3")),
    kept=("head.norm", "head.pre_logits"),
    check=CheckpointingRefused("stages"),
    channels_last=True,
)
