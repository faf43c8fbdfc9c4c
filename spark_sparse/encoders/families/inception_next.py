"""The InceptionNeXt family (timm ``MetaNeXt``: InceptionNeXt atto, tiny, small, base).

A block mixes space with an inception depthwise convolution (its channels split four ways: passed
through, a square 3x3, a 1 x 11 band and an 11 x 1 band, each depthwise, then joined), then a
batch norm, a 1x1 MLP with GELU, a layer scale, drop path, plus its input. The stem is a 4x4
patchify convolution and a norm, each later stage starts with a norm and a 2x2 stride-2 one.
timm's head MLP (``fc1`` and its ``norm``) runs on the pooled vector: kept (frozen, never run)
for strict loading.
"""

from __future__ import annotations

from timm.models.inception_next import ConvMlp, InceptionDWConv2d, MetaNeXt, MetaNeXtBlock, MetaNeXtStage
from torch import nn

from ..family import Family
from ..layouts import NamedStages
from ..leaves import ChannelConcat, ChannelSplit
from ..mirrors import Converter, MirrorChildren, MirrorDownsampleBlocks, mirror_layer_scale
from ..refusals import CheckpointingRefused, unsupported


class MirrorInceptionDWConv2d(nn.Module):
    """timm's InceptionDWConv2d: the identity channels, then dwconv_hw, dwconv_w and dwconv_h on
    their own channels, joined in that order."""

    def __init__(self, module: InceptionDWConv2d, convert: Converter, path: str):
        super().__init__()
        for name in ("dwconv_hw", "dwconv_w", "dwconv_h"):
            setattr(self, name, convert.leaf(getattr(module, name), f"{path}.{name}"))
        identity, branch = module.split_indexes[:2]
        # parameter-free leaves under names timm's module does not use
        self.split_identity = convert.leaf(ChannelSplit(identity), f"{path}.split_identity")
        self.split_branch = convert.leaf(ChannelSplit(branch), f"{path}.split_branch")
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat")

    def forward(self, x):
        x_id, rest = self.split_identity(x)
        x_hw, rest = self.split_branch(rest)
        x_w, x_h = self.split_branch(rest)
        return self.concat(x_id, self.dwconv_hw(x_hw), self.dwconv_w(x_w), self.dwconv_h(x_h))


class MirrorConvMlp(nn.Module):
    """timm's inception_next ConvMlp: fc1, norm, act, fc2 (1x1 convolutions; dropout must be 0)."""

    def __init__(self, mlp: ConvMlp, convert: Converter, path: str):
        super().__init__()
        if mlp.drop.p > 0:
            raise unsupported(mlp.drop, f"{path}.drop", f"dropout p={mlp.drop.p} inside the MLP")
        for name in ("fc1", "norm", "act", "fc2"):
            setattr(self, name, convert.leaf(getattr(mlp, name), f"{path}.{name}"))

    def forward(self, x):
        return self.fc2(self.act(self.norm(self.fc1(x))))


class MirrorMetaNeXtBlock(MirrorChildren):
    """timm's MetaNeXtBlock: token mixer, norm, MLP, [layer scale], drop path, + its input."""

    children_names = ("token_mixer", "norm", "mlp", "drop_path")

    def __init__(self, block: MetaNeXtBlock, convert: Converter, path: str):
        super().__init__(block, convert, path)
        mirror_layer_scale(self, block, convert, path)

    def forward(self, x):
        y = self.mlp(self.norm(self.token_mixer(x)))
        if self.gamma is not None:
            y = self.scale(y, self.gamma)
        return self.drop_path(y) + x


INCEPTION_NEXT = Family(
    name="inception_next",
    timm_class=MetaNeXt,
    mirrors={MetaNeXtStage: MirrorDownsampleBlocks, MetaNeXtBlock: MirrorMetaNeXtBlock,
             InceptionDWConv2d: MirrorInceptionDWConv2d, ConvMlp: MirrorConvMlp},
    layout=NamedStages(("stem",), ("stages.0", "stages.1", "stages.2", "stages.3")),
    kept=("head.fc1", "head.norm"),
    check=CheckpointingRefused("stages"),
)
