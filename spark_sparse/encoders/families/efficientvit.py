"""The EfficientViT family (timm ``efficientvit_mit``: MIT's EfficientViT-B0..B3, ``EfficientVit``,
and -L1..L3, ``EfficientVitLarge``; the backbones of EfficientViT-SAM), its attention included.

Blocks are conv-norm-acts in timm's module's own ``ConvNormAct`` (convolution, optional norm,
optional activation): depthwise separable (DSConv), inverted residual (MBConv), fused (FusedMBConv)
and two 3x3s (ConvBlock, the large stems), each in a ``ResidualBlock`` (plus its input where it
keeps the shape). The last two stages (the last in -L) add ViT blocks: lightweight multi-scale
linear attention (``LiteMLA``: a 1x1 to q, k, v, their depthwise 5x5 and grouped 1x1 aggregation
beside them, ReLU linear attention per head over the image's tokens, a 1x1 projection), then an
MBConv. Its attention is linear in the tokens: a hidden token adds nothing, so the attention of
an image's visible tokens is exact in both engines (``attention.LinearAttention``), no mask ratio
leaking in. The head's 1x1 conv-norm-act runs before pooling: it ends the last stage; the MLP
classifier after pooling is kept, frozen.
"""

from __future__ import annotations

from timm.models.efficientvit_mit import (ClassifierHead, ConvBlock, ConvNormAct, DSConv, EfficientVit,
                                          EfficientVitBlock, EfficientVitLarge, EfficientVitLargeStage,
                                          EfficientVitStage, FusedMBConv, LiteMLA, MBConv, ResidualBlock, Stem)
from torch import nn

from ..attention import LinearAttention
from ..family import Family
from ..layouts import Layout, NamedStages
from ..leaves import ChannelConcat
from ..mirrors import Converter, MirrorChildren, MirrorInOrder, MirrorSequential
from ..refusals import CheckpointingRefused, unsupported


class MirrorConvNormAct(MirrorInOrder):
    """The module's own conv-norm-act: conv, norm, act (identities where absent); no dropout."""

    children_names = ("conv", "norm", "act")
    dropouts = ("dropout",)


class MirrorResidualBlock(MirrorChildren):
    """main(pre_norm(x)), plus shortcut(x) where the block has one."""

    children_names = ("pre_norm", "main", "shortcut")

    def forward(self, x):
        y = self.main(self.pre_norm(x))
        return y if self.shortcut is None else y + self.shortcut(x)


class MirrorLiteMLA(nn.Module):
    """qkv, its aggregations beside it (joined as timm's ``torch.cat``), the linear attention, proj."""

    def __init__(self, module: LiteMLA, convert: Converter, path: str):
        super().__init__()
        if type(module.kernel_func) is not nn.ReLU:
            raise unsupported(module.kernel_func, f"{path}.kernel_func", "only ReLU's linear attention is mirrored")
        self.qkv = convert(module.qkv, f"{path}.qkv")
        self.aggreg = nn.ModuleList(convert(op, f"{path}.aggreg.{i}") for i, op in enumerate(module.aggreg))
        # parameter-free leaves under names timm's module does not use
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat")
        self.attention = convert.leaf(LinearAttention(module.dim, module.eps), f"{path}.attention")
        self.proj = convert(module.proj, f"{path}.proj")

    def forward(self, x):
        qkv = self.qkv(x)
        return self.proj(self.attention(self.concat(qkv, *(op(qkv) for op in self.aggreg))))


# blocks and stages that run their children in order
class MirrorDSConv(MirrorInOrder):
    children_names = ("depth_conv", "point_conv")


class MirrorMBConv(MirrorInOrder):
    children_names = ("inverted_conv", "depth_conv", "point_conv")


class MirrorFusedMBConv(MirrorInOrder):
    children_names = ("spatial_conv", "point_conv")


class MirrorConvBlock(MirrorInOrder):
    children_names = ("conv1", "conv2")


class MirrorEfficientVitBlock(MirrorInOrder):
    children_names = ("context_module", "local_module")


class MirrorBlocks(MirrorInOrder):
    """A stage: its Sequential ``blocks``."""

    children_names = ("blocks",)


class MirrorHead(MirrorChildren):
    """The classifier head's ``in_conv`` (run before pooling, as the last stage's end); the rest
    of the head is kept, frozen (``Family.kept``)."""

    children_names = ("in_conv",)


def layout(model: nn.Module) -> Layout:
    """The stem, the four stages, and the head's 1x1 ``in_conv`` ending the last, which then has
    its output channels."""
    stages = NamedStages(("stem",), ("stages.0", "stages.1", "stages.2", "stages.3"), head=("head.in_conv",))(model)
    conv = getattr(model.head.in_conv, "conv", None)  # timm's reset_classifier(reset_other=True) drops it
    channels = stages.channels[:-1] + (model.num_features if conv is None else conv.out_channels,)
    return stages._replace(channels=channels)


EFFICIENTVIT = Family(
    name="efficientvit_mit",
    timm_class=EfficientVit,
    other_classes=(EfficientVitLarge,),
    mirrors={ConvNormAct: MirrorConvNormAct, ResidualBlock: MirrorResidualBlock, LiteMLA: MirrorLiteMLA,
             DSConv: MirrorDSConv, MBConv: MirrorMBConv, FusedMBConv: MirrorFusedMBConv, ConvBlock: MirrorConvBlock,
             EfficientVitBlock: MirrorEfficientVitBlock, EfficientVitStage: MirrorBlocks,
             EfficientVitLargeStage: MirrorBlocks, Stem: MirrorSequential, ClassifierHead: MirrorHead},
    layout=layout,
    kept=("head.classifier",),
    check=CheckpointingRefused("stages"),
    norm_acts={MirrorConvNormAct: (("norm", "act"),)},
)
