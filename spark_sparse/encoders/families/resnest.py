"""ResNeSt's blocks (timm's ``resnest`` module: ResNet models of ResNestBottleneck blocks).

A bottleneck's 3x3 is split attention: a grouped convolution makes ``radix`` maps, their sum's
mean over each image's visible sites is squeezed (1x1, norm, ReLU, 1x1) into weights, softmaxed
across the radix (a sigmoid for one), and the maps are summed with them. A strided block pools
instead of striding its 3x3: a 3x3 average pooling before or after it (hidden sites read zero
and are counted, as the padding). The family is timm's ResNet (resnet.py).
"""

from __future__ import annotations

import copy

from timm.layers.split_attn import SplitAttn
from timm.models.resnest import ResNestBottleneck
from torch import nn

from ..leaves import ImageMean, RadixSum
from ..mirrors import Converter, MirrorChildren
from ..refusals import reject_extras


class MirrorSplitAttn(nn.Module):
    """timm's SplitAttn: conv, bn0, act0, then the maps weighted by their squeezed mean. The squeeze
    (fc1, bn1, act1, fc2, rsoftmax) runs on (B, C) vectors: timm's own modules, in every engine."""

    def __init__(self, module: SplitAttn, convert: Converter, path: str):
        super().__init__()
        reject_extras(module, path, ("drop",))
        for name in ("conv", "bn0", "act0"):
            setattr(self, name, convert.leaf(getattr(module, name), f"{path}.{name}"))
        for name in ("fc1", "bn1", "act1", "fc2", "rsoftmax"):
            setattr(self, name, copy.deepcopy(getattr(module, name)))
        self.radix = module.radix
        # parameter-free leaves under names timm's module does not use
        self.mean = convert.leaf(ImageMean(), f"{path}.mean")
        self.weighted_sum = convert.leaf(RadixSum(module.radix), f"{path}.weighted_sum")

    def forward(self, x):
        x = self.act0(self.bn0(self.conv(x)))
        pooled = self.mean(x)  # (B, radix x C): the mean of the maps' sum is the sum of their means
        pooled = pooled.view(pooled.shape[0], self.radix, -1).sum(1)[:, :, None, None]
        weights = self.rsoftmax(self.fc2(self.act1(self.bn1(self.fc1(pooled)))))
        return self.weighted_sum(x, weights.view(weights.shape[0], -1))


class MirrorResNestBottleneck(MirrorChildren):
    """timm's ResNestBottleneck: 1x1, [pool], split attention (or a 3x3 conv-norm-act), [pool],
    1x1, + shortcut (timm drops paths of the block's input, before its downsample), act."""

    # the poolings may be None; conv2 is a mirror
    children_names = ("conv1", "bn1", "act1", "avd_first", "bn2", "act2", "avd_last", "conv3", "bn3", "act3",
                      "conv2", "downsample", "drop_path")

    def __init__(self, block: ResNestBottleneck, convert: Converter, path: str):
        reject_extras(block, path, ("drop_block",))
        super().__init__(block, convert, path)

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        if self.avd_first is not None:
            out = self.avd_first(out)
        out = self.act2(self.bn2(self.conv2(out)))
        if self.avd_last is not None:
            out = self.avd_last(out)
        out = self.bn3(self.conv3(out))
        if self.drop_path is not None:
            x = self.drop_path(x)
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act3(out + shortcut)


MIRRORS = {ResNestBottleneck: MirrorResNestBottleneck, SplitAttn: MirrorSplitAttn}
# the norms whose activation comes before the residual addition
NORM_ACTS = {MirrorResNestBottleneck: (("bn1", "act1"), ("bn2", "act2")), MirrorSplitAttn: (("bn0", "act0"),)}
