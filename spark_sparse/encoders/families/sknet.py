"""Selective kernel blocks (timm's ``sknet`` module: SKResNet-18/34/50/50d, SKResNeXt-50, ResNet
models of their own blocks).

A selective kernel convolution runs its paths (a 3x3 conv-norm-act and a 3x3 with dilation 2,
the "5x5"; each on its share of the input channels where the input is split) side by side, and
mixes them by per-channel weights: a softmax across paths of an attention (1x1, batch norm, ReLU,
1x1) on each image's mean of the paths' sum over its visible sites. The dilated path runs as
dilated.py's ``DilatedConvolution``. The family is timm's ResNet (resnet.py).
"""

from __future__ import annotations

import copy

from timm.layers import ConvNormAct, SelectiveKernel
from timm.models.sknet import SelectiveKernelBasic, SelectiveKernelBottleneck
from torch import nn

from ..leaves import ChannelConcat, ChannelSplit, ImageMean, RadixSum, split_in_turn
from ..mirrors import Converter, MirrorConvNormAct


class MirrorSelectiveKernel(nn.Module):
    """timm's SelectiveKernel: [the input split by channels,] its paths, the paths' maps weighted
    by the attention's softmax and summed. The attention runs on (B, C) vectors: timm's own
    modules, in every engine."""

    def __init__(self, module: SelectiveKernel, convert: Converter, path: str):
        super().__init__()
        self.paths = nn.ModuleList(convert(p, f"{path}.paths.{i}") for i, p in enumerate(module.paths))
        self.attn = copy.deepcopy(module.attn)
        self.num_paths, self.split_input = module.num_paths, module.split_input
        # parameter-free leaves under names timm's module does not use
        self.split = convert.leaf(ChannelSplit(module.in_channels // module.num_paths), f"{path}.split")
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat")
        self.mean = convert.leaf(ImageMean(), f"{path}.mean")
        self.weighted_sum = convert.leaf(RadixSum(module.num_paths), f"{path}.weighted_sum")

    def forward(self, x):
        # timm's torch.split into equal shares, or the whole input to every path
        inputs = split_in_turn([self.split] * (self.num_paths - 1), x) if self.split_input else [x] * self.num_paths
        maps = self.concat(*(p(share) for p, share in zip(self.paths, inputs)))  # (paths x C) channels
        pooled = self.mean(maps)  # the mean of the paths' sum is the sum of their means
        b = pooled.shape[0]
        pooled = pooled.view(b, self.num_paths, -1).sum(1)[:, :, None, None]
        a = self.attn
        weights = a.fc_select(a.act(a.bn(a.fc_reduce(pooled)))).view(b, self.num_paths, -1).softmax(1)
        return self.weighted_sum(maps, weights.view(b, -1))


class MirrorSelectiveKernelBlock(nn.Module):
    """timm's SelectiveKernelBasic (conv1 selective, conv2) and SelectiveKernelBottleneck (conv1,
    conv2 selective, conv3): the convolutions, [se], [drop path], + shortcut, act."""

    def __init__(self, block: nn.Module, convert: Converter, path: str):
        super().__init__()
        self.convs = ("conv1", "conv2") + (("conv3",) if hasattr(block, "conv3") else ())
        for name in self.convs + ("se", "drop_path", "downsample", "act"):
            self.add_module(name, convert(getattr(block, name), f"{path}.{name}"))

    def forward(self, x):
        out = x
        for name in self.convs:
            out = getattr(self, name)(out)
        if self.se is not None:
            out = self.se(out)
        if self.drop_path is not None:
            out = self.drop_path(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act(out + shortcut)


MIRRORS = {SelectiveKernelBasic: MirrorSelectiveKernelBlock, SelectiveKernelBottleneck: MirrorSelectiveKernelBlock,
           SelectiveKernel: MirrorSelectiveKernel, ConvNormAct: MirrorConvNormAct}
