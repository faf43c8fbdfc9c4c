"""The EfficientFormer family (timm ``efficientformer``: ``efficientformer_l1``, ``_l3``, ``_l7``).

A stem of two 3x3 stride-2 conv-norm-ReLUs, then four stages, each but the first starting with a 3x3
stride-2 conv-norm. Their blocks are PoolFormer's (Meta4D: x + layer scale(the 3x3 mean of each
window's visible sites minus x), then x + layer scale(1x1, batch norm, GELU, 1x1, batch norm)), but
the last stage's last block (``num_vit``), a transformer block (Meta3D: layer norm, attention, layer
scale, then the same with a linear MLP) after timm flattens the map into tokens (``Flat``: nothing to
do on rows). The final layer norm ends the last stage.

The attention spans the 7x7 map of a 224-pixel image at stride 32, with a learned bias per head and
relative offset (|dy|, |dx|) on that grid (``attention_biases``, timm's name): here each visible token
attends to its image's visible tokens with the bias of their offset (``attention.WindowAttention``,
one 7x7 group: each head's q, k, v side by side), as TinyViT's whole-map groups.
"""

from __future__ import annotations

from timm.layers import LayerScale, LayerScale2d, Mlp
from timm.models.efficientformer import (Attention, ConvMlpWithNorm, Downsample, EfficientFormer,
                                         EfficientFormerStage, Flat, MetaBlock1d, MetaBlock2d, Pooling, Stem4)
from torch import nn

from ..attention import WindowAttention
from .convnext import MirrorMlp
from ..family import Family, normed_stage_outputs
from ..layouts import NamedStages
from ..mirrors import (Converter, MirrorChildren, MirrorDownsampleBlocks, MirrorInOrder, MirrorLayerScale,
                       MirrorSequential)
from ..refusals import CheckpointingRefused, unsupported
from .metaformer import MirrorPooling


def mirror_flat(module: Flat, convert: Converter, path: str) -> nn.Module:
    """timm's map-to-tokens reshape: the engines' rows and maps need none."""
    return nn.Identity()


class MirrorDownsample(MirrorInOrder):
    """A stage's 3x3 stride-2 convolution, then its norm."""

    children_names = ("conv", "norm")


class MirrorConvMlpWithNorm(MirrorInOrder):
    """fc1, norm1, act, fc2, norm2 (1x1 convolutions and batch norms; dropout 0)."""

    children_names = ("fc1", "norm1", "act", "fc2", "norm2")
    dropouts = ("drop",)


class MirrorMetaBlock2d(MirrorChildren):
    """x + drop_path1(ls1(token_mixer(x))), then x + drop_path2(ls2(mlp(x)))."""

    children_names = ("token_mixer", "ls1", "drop_path1", "mlp", "ls2", "drop_path2")

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.token_mixer(x)))
        return x + self.drop_path2(self.ls2(self.mlp(x)))


class MirrorMetaBlock1d(MirrorChildren):
    """x + drop_path1(ls1(token_mixer(norm1(x)))), then x + drop_path2(ls2(mlp(norm2(x))))."""

    children_names = ("norm1", "token_mixer", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.token_mixer(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class MirrorAttention(MirrorChildren):
    """qkv, attention over the image's visible tokens with the bias of each pair's offset on the
    7x7 grid, proj; ``attention_biases`` (heads, 49) keeps timm's name."""

    children_names = ("qkv", "proj")

    def __init__(self, module: Attention, convert: Converter, path: str):
        super().__init__(module, convert, path)
        self.attention_biases = nn.Parameter(module.attention_biases.detach().clone())
        self.register_buffer("attention_bias_idxs", module.attention_bias_idxs.clone())  # in timm's state dict
        side = round(module.attention_bias_idxs.shape[0] ** 0.5)
        if side * side != module.attention_bias_idxs.shape[0]:
            raise unsupported(module, path, f"attention over {module.attention_bias_idxs.shape[0]} positions "
                                            "(not a square grid)")
        # parameter-free, a name timm's module lacks
        self.attention = convert.leaf(WindowAttention(module.num_heads, module.key_dim, module.val_dim, side,
                                                      per_head=True), f"{path}.attention")

    def forward(self, x):
        return self.proj(self.attention(self.qkv(x), self.attention_biases[:, self.attention_bias_idxs]))


EFFICIENTFORMER = Family(
    name="efficientformer",
    timm_class=EfficientFormer,
    mirrors={Stem4: MirrorSequential, Downsample: MirrorDownsample, EfficientFormerStage: MirrorDownsampleBlocks,
             MetaBlock2d: MirrorMetaBlock2d, MetaBlock1d: MirrorMetaBlock1d, Pooling: MirrorPooling,
             ConvMlpWithNorm: MirrorConvMlpWithNorm, Attention: MirrorAttention, Mlp: MirrorMlp, Flat: mirror_flat,
             LayerScale: MirrorLayerScale, LayerScale2d: MirrorLayerScale},
    layout=NamedStages(("stem",), ("stages.0", "stages.1", "stages.2", "stages.3"), head=("norm",)),
    check=CheckpointingRefused("stages"),
    features=normed_stage_outputs(EfficientFormer, "stem"),
)
