"""The SwiftFormer family (timm ``SwiftFormer``: ``swiftformer_xs``, ``_s``, ``_l1``, ``_l3``).

A stem of two 3x3 stride-2 conv-norm-ReLUs; each later stage begins with a 3x3 stride-2
convolution and a batch norm. A stage's blocks are ConvEncoders (a depthwise 3x3, a batch norm, a
1x1 MLP with GELU, layer scale, plus the input) but its last, a SwiftFormer block: the same local
representation, then efficient additive attention (``attention.AdditiveAttention``: a global query
pooled over the image's visible tokens, here, where timm pools over the map) and a 1x1 MLP after a
batch norm, each layer-scaled and added. The final batch norm runs before pooling: it ends the last
stage. The two classifiers (a head and a distillation head) are kept, frozen.
"""

from __future__ import annotations

from timm.models.swiftformer import (Block, ConvEncoder, Embedding, LayerScale2d, LocalRepresentation, Mlp, Stage,
                                     SwiftFormer)

from ..family import Family
from ..layouts import NamedStages
from ..mirrors import MirrorChildren, MirrorDownsampleBlocks, MirrorInOrder, MirrorLayerScale
from ..refusals import CheckpointingRefused


class MirrorEmbedding(MirrorInOrder):
    """A stage's first layers: the 3x3 stride-2 convolution, then its norm."""

    children_names = ("proj", "norm")


class MirrorConvEncoder(MirrorChildren):
    """x + drop_path(layer_scale(pwconv2(act(pwconv1(norm(dwconv(x))))))): the ConvEncoder and the
    SwiftFormer block's local representation alike."""

    children_names = ("dwconv", "norm", "pwconv1", "act", "pwconv2", "layer_scale", "drop_path")

    def forward(self, x):
        y = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))
        return x + self.drop_path(self.layer_scale(y))


class MirrorMlp(MirrorInOrder):
    """SwiftFormer's MLP: norm1, fc1, act, fc2 (its dropout must be 0)."""

    children_names = ("norm1", "fc1", "act", "fc2")
    dropouts = ("drop",)


class MirrorBlock(MirrorChildren):
    """local_representation, then x + drop_path(layer_scale_1(attn(x))), then the same with the MLP."""

    children_names = ("local_representation", "attn", "linear", "drop_path", "layer_scale_1", "layer_scale_2")

    def forward(self, x):
        x = self.local_representation(x)
        x = x + self.drop_path(self.layer_scale_1(self.attn(x)))
        return x + self.drop_path(self.layer_scale_2(self.linear(x)))


SWIFTFORMER = Family(
    name="swiftformer",
    timm_class=SwiftFormer,
    mirrors={Embedding: MirrorEmbedding, ConvEncoder: MirrorConvEncoder, LocalRepresentation: MirrorConvEncoder,
             Mlp: MirrorMlp, Block: MirrorBlock, Stage: MirrorDownsampleBlocks, LayerScale2d: MirrorLayerScale},
    layout=NamedStages(("stem",), ("stages.0", "stages.1", "stages.2", "stages.3"), head=("norm",)),
    kept=("head", "head_dist"),  # the classifiers after pooling (identities without classes)
    check=CheckpointingRefused("stages"),
)
