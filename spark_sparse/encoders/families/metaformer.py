"""timm's MetaFormer family ("MetaFormer Baselines for Vision"): ConvFormer (``convformer_s18`` ..
``_b36``), PoolFormer (``poolformer_*``, ``poolformerv2_*``) and CAFormer (``caformer_*``).

A block is a norm -> token mixer -> drop path -> [layer scale], added to its input times a learned
per-channel ``res_scale`` (where the stage has one), then the same with an MLP (1x1 fc1, an
activation, 1x1 fc2). ConvFormer's token mixer is MobileNetV2's inverted separable convolution:
1x1 expansion, StarReLU (``scale * relu(x) ** 2 + bias``: hidden sites would read the bias, so
the dense-masked engine masks before the depthwise convolution reads them), depthwise 7x7, 1x1
projection; its norms are bias-free layer norms per site. PoolFormer's token mixer is a 3x3 average
pooling minus its input, the pooling leaving its padding uncounted: here the mean of the window's
visible sites (torch's where nothing is hidden; hidden sites count as the padding does, not at all,
which keeps features canvas-invariant); its norms are group norms of one group, each image's
statistics over its visible sites. The stem is a 7x7 stride-4 convolution padded 2 then a norm (none
in PoolFormer V1); each later stage begins with a norm (idem) and a 3x3 stride-2 convolution. The
classifier head's norm runs after pooling and is kept (frozen, never run) for strict loading.

CAFormer's last two stages mix tokens by multi-head self-attention (``attention.SelfAttention``):
each visible token attends to its image's visible tokens only, on channels-last tokens in timm and
on the engines' rows or maps here (the same tokens).
"""

from __future__ import annotations

from timm.layers import Mlp
from timm.models.metaformer import (Downsampling, MetaFormer, MetaFormerBlock, MetaFormerStage, Pooling, Scale, SepConv,
                                    Stem)
from torch import nn

from .convnext import MirrorMlp
from ..family import Family
from ..layouts import NamedStages
from ..leaves import LayerScale
from ..mirrors import Converter, MirrorChildren, MirrorDownsampleBlocks, MirrorInOrder
from ..refusals import CheckpointingRefused


class MirrorStem(MirrorInOrder):
    """The 7x7 stride-4 convolution, then its norm (an identity where the model has none)."""

    children_names = ("conv", "norm")


class MirrorDownsampling(MirrorInOrder):
    """A stage's first layers: the norm, then the 3x3 stride-2 convolution."""

    children_names = ("norm", "conv")


class MirrorSepConv(MirrorInOrder):
    """ConvFormer's token mixer: pwconv1, act1, dwconv, act2, pwconv2."""

    children_names = ("pwconv1", "act1", "dwconv", "act2", "pwconv2")


class MirrorPooling(MirrorChildren):
    """PoolFormer's token mixer: the 3x3 average pooling minus its input."""

    children_names = ("pool",)

    def forward(self, x):
        return self.pool(x) - x


class MirrorScale(nn.Module):
    """MetaFormer's Scale (layer scale and res scale): a learned per-channel factor, kept under
    timm's name and shape (``scale``, (C,))."""

    def __init__(self, module: Scale, convert: Converter, path: str):
        super().__init__()
        self.scale = nn.Parameter(module.scale.detach().clone())
        self.multiply = convert.leaf(LayerScale(), f"{path}.scale")

    def forward(self, x):
        return self.multiply(x, self.scale)


class MirrorMetaFormerBlock(MirrorChildren):
    """x = res_scale1(x) + layer_scale1(drop_path1(token_mixer(norm1(x)))), then the same with
    norm2 and the MLP (each scale an identity where the stage has none)."""

    children_names = ("norm1", "token_mixer", "drop_path1", "layer_scale1", "res_scale1",
                      "norm2", "mlp", "drop_path2", "layer_scale2", "res_scale2")

    def forward(self, x):
        x = self.res_scale1(x) + self.layer_scale1(self.drop_path1(self.token_mixer(self.norm1(x))))
        return self.res_scale2(x) + self.layer_scale2(self.drop_path2(self.mlp(self.norm2(x))))


METAFORMER = Family(
    name="metaformer",
    timm_class=MetaFormer,
    mirrors={Stem: MirrorStem, Downsampling: MirrorDownsampling, MetaFormerStage: MirrorDownsampleBlocks,
             MetaFormerBlock: MirrorMetaFormerBlock, SepConv: MirrorSepConv, Pooling: MirrorPooling, Scale: MirrorScale,
             Mlp: MirrorMlp},
    layout=NamedStages(("stem",), ("stages.0", "stages.1", "stages.2", "stages.3")),
    kept=("head.norm",),
    check=CheckpointingRefused("stages"),
)
