"""The RepViT family (timm ``RepVit``: M0.9-M2.3, "Revisiting Mobile CNN From ViT Perspective").

A block mixes space with a re-parameterisable depthwise unit (a kxk depthwise conv-norm, a
depthwise 1x1 and the input summed, then a batch norm; the legacy variant's 1x1 has its own norm
and no norm after), [SE], then mixes channels with a 1x1 conv-norm MLP plus its input. A stage
after the first starts with a block, a strided depthwise conv-norm, a 1x1 conv-norm and an MLP
with a residual; the stem is two strided 3x3 conv-norms with GELU between. Everything runs in
training form: SparK pretrains the branches, which timm's ``fuse`` merges afterwards.
"""

from __future__ import annotations

from timm.models.repvit import (ConvNorm, RepVggDw, RepViTBlock, RepVit, RepVitDownsample, RepVitMlp, RepVitStage,
                                RepVitStem)
from torch import nn

from ..family import Family
from ..layouts import NamedStages
from ..mirrors import Converter, MirrorDownsampleBlocks, MirrorSequential
from ..refusals import CheckpointingRefused


def _children(mirror: nn.Module, module: nn.Module, convert: Converter, path: str, names: tuple[str, ...]) -> None:
    for name in names:
        mirror.add_module(name, convert(getattr(module, name), f"{path}.{name}"))


class MirrorRepVggDw(nn.Module):
    """timm's RepVggDw: bn(conv(x) + conv1(x) + x)."""

    def __init__(self, module: RepVggDw, convert: Converter, path: str):
        super().__init__()
        _children(self, module, convert, path, ("conv", "conv1", "bn"))

    def forward(self, x):
        return self.bn(self.conv(x) + self.conv1(x) + x)


class MirrorRepVitMlp(nn.Module):
    """timm's RepVitMlp: conv1 (1x1 conv-norm), act, conv2 (1x1 conv-norm)."""

    def __init__(self, module: RepVitMlp, convert: Converter, path: str):
        super().__init__()
        _children(self, module, convert, path, ("conv1", "act", "conv2"))

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x)))


class MirrorRepViTBlock(nn.Module):
    """timm's RepViTBlock: token mixer, [SE], then the channel mixer plus its input."""

    def __init__(self, block: RepViTBlock, convert: Converter, path: str):
        super().__init__()
        _children(self, block, convert, path, ("token_mixer", "se", "channel_mixer"))

    def forward(self, x):
        x = self.se(self.token_mixer(x))
        return self.channel_mixer(x) + x


class MirrorRepVitStem(nn.Module):
    """timm's RepVitStem: conv1 (3x3, stride 2, norm), act1, conv2 (3x3, stride 2, norm)."""

    def __init__(self, stem: RepVitStem, convert: Converter, path: str):
        super().__init__()
        _children(self, stem, convert, path, ("conv1", "act1", "conv2"))

    def forward(self, x):
        return self.conv2(self.act1(self.conv1(x)))


class MirrorRepVitDownsample(nn.Module):
    """timm's RepVitDownsample: a block, a strided depthwise conv-norm, a 1x1 conv-norm, then an
    MLP plus its input."""

    def __init__(self, module: RepVitDownsample, convert: Converter, path: str):
        super().__init__()
        _children(self, module, convert, path, ("pre_block", "spatial_downsample", "channel_downsample", "ffn"))

    def forward(self, x):
        x = self.channel_downsample(self.spatial_downsample(self.pre_block(x)))
        return self.ffn(x) + x


REPVIT = Family(
    name="repvit",
    timm_class=RepVit,
    mirrors={ConvNorm: MirrorSequential, RepVggDw: MirrorRepVggDw, RepVitMlp: MirrorRepVitMlp,
             RepViTBlock: MirrorRepViTBlock, RepVitStem: MirrorRepVitStem, RepVitDownsample: MirrorRepVitDownsample,
             RepVitStage: MirrorDownsampleBlocks},
    layout=NamedStages(("stem",), ("stages.0", "stages.1", "stages.2", "stages.3")),
    check=CheckpointingRefused("stages"),
)
