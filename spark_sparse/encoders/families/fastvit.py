"""The FastViT family (timm ``fastvit``: FastViT-T8, -T12 and -S12, whose every stage mixes tokens
with RepMixer, and the SA, MA and MobileCLIP ones with attention in the last; at train time or
re-parameterised).

A stem of three MobileOne blocks (3x3 stride 2, a depthwise 3x3 stride 2, a 1x1: each a sum of
conv-norm branches and an identity norm, then GELU), then four stages. A stage (but the first)
starts with a patch embedding: a 7x7 stride-2 convolution of two outputs per input channel plus
a 3x3 one beside it (RepLKNet's large kernel), then a 1x1 MobileOne block. A RepMixer block adds
to its input the layer-scaled difference of a MobileOne depthwise 3x3 and a norm of the input,
then a layer-scaled MLP (a depthwise 7x7 conv-norm, 1x1, GELU, 1x1); a MobileOne 3x3 with SE ends
the last stage. Over 2x2 blocks (stride 16 to 32) the 7x7's window reaches past the neighbours'
tables: it runs on the canvas (``GroupedConvolution.canvas_rows``).

The models with attention in their last stage (``fastvit_sa*``, ``_ma36``, ``_mci0/1/2``) begin it
with a conditional positional encoding (the input plus a depthwise 7x7 of it, or its re-parameterised
convolution) and mix tokens by multi-head self-attention over each image's visible tokens
(``attention.SelfAttention``) after a batch norm, each block adding its layer-scaled output and then
an MLP's, as RepMixer blocks do.
"""

from __future__ import annotations

from timm.layers import ConvNormAct
from timm.models.fastvit import (AttentionBlock, ConvMlp, FastVit, FastVitStage, LayerScale2d, MobileOneBlock,
                                 PatchEmbed, RepConditionalPosEnc, ReparamLargeKernelConv, RepMixer, RepMixerBlock)
from torch import nn

from ..family import Family
from ..layouts import TappedStages
from ..mirrors import Converter, MirrorChildren, MirrorConvNormAct, MirrorLayerScale
from ..refusals import CheckpointingRefused, unsupported


class MirrorMobileOneBlock(MirrorChildren):
    """FastViT's MobileOneBlock: the sum of its identity norm, 1x1 "scale" conv-norm and k x k
    conv-norm branches (or its re-parameterised convolution), SE, activation."""

    children_names = ("reparam_conv", "identity", "conv_scale", "se", "act")

    def __init__(self, block: MobileOneBlock, convert: Converter, path: str):
        super().__init__(block, convert, path)
        branches = getattr(block, "conv_kxk", None)
        self.conv_kxk = None if branches is None else nn.ModuleList(
            convert(b, f"{path}.conv_kxk.{i}") for i, b in enumerate(branches))

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.act(self.se(self.reparam_conv(x)))
        branches = [b for b in (self.conv_scale, self.identity) if b is not None] + list(self.conv_kxk or ())
        out = branches[0](x)
        for branch in branches[1:]:
            out = out + branch(x)
        return self.act(self.se(out))


class MirrorReparamLargeKernelConv(MirrorChildren):
    """ReparamLargeKernelConv: a large kernel's conv-norm + a small kernel's beside it (or the
    re-parameterised convolution), SE, activation."""

    children_names = ("reparam_conv", "large_conv", "small_conv", "se", "act")

    def forward(self, x):
        if self.reparam_conv is not None:
            out = self.reparam_conv(x)
        else:
            out = self.large_conv(x)
            if self.small_conv is not None:
                out = out + self.small_conv(x)
        return self.act(self.se(out))


class MirrorPatchEmbed(MirrorChildren):
    """PatchEmbed: its ``proj`` (the large-kernel convolution, a 1x1 MobileOne block)."""

    children_names = ("proj",)

    def forward(self, x):
        return self.proj(x)


class MirrorRepMixer(MirrorChildren):
    """RepMixer: x + layer scale (mixer(x) - norm(x)), or its re-parameterised depthwise convolution."""

    children_names = ("reparam_conv", "norm", "mixer", "layer_scale")

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return x + self.layer_scale(self.mixer(x) - self.norm(x))


class MirrorConvMlp(MirrorChildren):
    """ConvMlp: a depthwise 7x7 conv-norm, 1x1, activation, 1x1 (its dropout refused unless zero)."""

    children_names = ("conv", "fc1", "act", "fc2")

    def __init__(self, mlp: ConvMlp, convert: Converter, path: str):
        if mlp.drop.p > 0:
            raise unsupported(mlp.drop, f"{path}.drop", f"dropout p={mlp.drop.p} inside the MLP (proj_drop_rate); "
                                                        "set it to 0")
        super().__init__(mlp, convert, path)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.conv(x))))


class MirrorRepMixerBlock(MirrorChildren):
    """RepMixerBlock: the token mixer, then + drop path (layer scale (MLP))."""

    children_names = ("token_mixer", "mlp", "layer_scale", "drop_path")

    def forward(self, x):
        x = self.token_mixer(x)
        return x + self.drop_path(self.layer_scale(self.mlp(x)))


class MirrorRepConditionalPosEnc(MirrorChildren):
    """The conditional positional encoding: x + a depthwise 7x7 of x, or its re-parameterised convolution."""

    children_names = ("reparam_conv", "pos_enc")

    def forward(self, x):
        return self.reparam_conv(x) if self.reparam_conv is not None else self.pos_enc(x) + x


class MirrorAttentionBlock(MirrorChildren):
    """x + layer scale (self-attention (norm(x))), then + layer scale (MLP), each through drop path."""

    children_names = ("norm", "token_mixer", "layer_scale_1", "drop_path1", "mlp", "layer_scale_2", "drop_path2")

    def forward(self, x):
        x = x + self.drop_path1(self.layer_scale_1(self.token_mixer(self.norm(x))))
        return x + self.drop_path2(self.layer_scale_2(self.mlp(x)))


class MirrorFastVitStage(MirrorChildren):
    """FastVitStage: the patch embedding (none in the first stage), then its blocks."""

    children_names = ("downsample", "pos_emb", "blocks")

    def forward(self, x):
        return self.blocks(self.pos_emb(self.downsample(x)))


FASTVIT = Family(
    name="fastvit",
    timm_class=FastVit,
    mirrors={ConvNormAct: MirrorConvNormAct, MobileOneBlock: MirrorMobileOneBlock,
             ReparamLargeKernelConv: MirrorReparamLargeKernelConv, PatchEmbed: MirrorPatchEmbed,
             RepMixer: MirrorRepMixer, ConvMlp: MirrorConvMlp, RepMixerBlock: MirrorRepMixerBlock,
             FastVitStage: MirrorFastVitStage, LayerScale2d: MirrorLayerScale,
             RepConditionalPosEnc: MirrorRepConditionalPosEnc, AttentionBlock: MirrorAttentionBlock},
    layout=TappedStages(head=("final_conv",)),
    check=CheckpointingRefused("stages"),
)
