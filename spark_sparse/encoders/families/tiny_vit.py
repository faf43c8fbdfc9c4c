"""The TinyViT family (timm ``tiny_vit``: ``tiny_vit_5m_224``, ``_11m_224``, ``_21m_224``, ``_384``,
``_512``; MobileSAM's image encoder is TinyViT-5M).

A stem of two 3x3 stride-2 conv-norms with GELU between them, a first stage of MBConvs (1x1,
depthwise 3x3, 1x1 conv-norms with GELU, the last after the skip), then three stages that each
begin with patch merging (1x1, depthwise 3x3 stride 2, 1x1 conv-norms) and hold TinyViT blocks: x +
windowed attention(x), a depthwise 3x3 conv-norm, then x + an MLP after a layer norm.

The attention runs within groups of ``window_size`` x ``window_size`` sites laid from the map's
top-left corner (7 at strides 8 and 32, 14 at stride 16 for 224 px: the whole map there), after a
layer norm, with a learned bias per head and relative offset (|dy|, |dx|) inside the group
(``attention_biases``, timm's name). Each visible token attends to its group's visible tokens
(``attention.WindowAttention``, each head's q, k, v side by side); the sparse engine scatters the
rows into their groups' slots. The classifier head's norm (after pooling) is kept, frozen.
"""

from __future__ import annotations

from timm.models.tiny_vit import (Attention, ConvLayer, ConvNorm, MBConv, NormMlp, PatchEmbed, PatchMerging, TinyVit,
                                  TinyVitBlock, TinyVitStage)
from torch import nn

from ..attention import WindowAttention
from ..family import Family
from ..layouts import NamedStages
from ..leaves import square
from ..mirrors import Converter, MirrorChildren, MirrorDownsampleBlocks, MirrorInOrder, MirrorSequential
from ..refusals import CheckpointingRefused


class MirrorPatchEmbed(MirrorInOrder):
    """The stem: conv1, act, conv2 (3x3 stride-2 conv-norms)."""

    children_names = ("conv1", "act", "conv2")


class MirrorMBConv(MirrorChildren):
    """act3(x + drop_path(conv3(act2(conv2(act1(conv1(x))))))): the activation after the skip."""

    children_names = ("conv1", "act1", "conv2", "act2", "conv3", "drop_path", "act3")

    def forward(self, x):
        y = self.conv3(self.act2(self.conv2(self.act1(self.conv1(x)))))
        return self.act3(x + self.drop_path(y))


class MirrorPatchMerging(MirrorInOrder):
    """conv1, act1, conv2 (depthwise 3x3, stride 2), act2, conv3."""

    children_names = ("conv1", "act1", "conv2", "act2", "conv3")


class MirrorConvLayer(MirrorInOrder):
    """The first stage: its MBConvs."""

    children_names = ("blocks",)


class MirrorNormMlp(MirrorInOrder):
    """norm, fc1, act, fc2 (dropout 0)."""

    children_names = ("norm", "fc1", "act", "fc2")
    dropouts = ("drop1", "drop2")


class MirrorAttention(MirrorChildren):
    """norm, qkv, attention within each group of sites with the bias of each pair's relative
    offset, proj; ``attention_biases`` (heads, offsets) keeps timm's name."""

    children_names = ("norm", "qkv", "proj")

    def __init__(self, module: Attention, convert: Converter, path: str):
        super().__init__(module, convert, path)
        self.attention_biases = nn.Parameter(module.attention_biases.detach().clone())
        self.register_buffer("attention_bias_idxs", module.attention_bias_idxs.clone(), persistent=False)
        window = square(module.resolution, module, path)
        # parameter-free, a name timm's module lacks
        self.attention = convert.leaf(WindowAttention(module.num_heads, module.key_dim, module.val_dim, window,
                                                      per_head=True), f"{path}.attention")

    def forward(self, x):
        bias = self.attention_biases[:, self.attention_bias_idxs]
        return self.proj(self.attention(self.qkv(self.norm(x)), bias))


class MirrorTinyVitBlock(MirrorChildren):
    """x + drop_path1(attn(x)) (in groups of sites), local_conv, then x + drop_path2(mlp(x))."""

    children_names = ("attn", "drop_path1", "local_conv", "mlp", "drop_path2")

    def forward(self, x):
        x = self.local_conv(x + self.drop_path1(self.attn(x)))
        return x + self.drop_path2(self.mlp(x))


TINY_VIT = Family(
    name="tiny_vit",
    timm_class=TinyVit,
    mirrors={PatchEmbed: MirrorPatchEmbed, ConvNorm: MirrorSequential, MBConv: MirrorMBConv,
             PatchMerging: MirrorPatchMerging, ConvLayer: MirrorConvLayer, TinyVitStage: MirrorDownsampleBlocks,
             TinyVitBlock: MirrorTinyVitBlock, Attention: MirrorAttention, NormMlp: MirrorNormMlp},
    layout=NamedStages(("patch_embed",), ("stages.0", "stages.1", "stages.2", "stages.3")),
    kept=("head.norm",),  # the classifier head's norm, after pooling
    check=CheckpointingRefused("stages"),
)
