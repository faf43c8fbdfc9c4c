"""The LowFormer family (timm ``lowformer``: B0, B1, B1.5, B2, B3 of WACV 2025, and the edge-GPU
E1, E2, E3 of its IJCV 2026 extension).

CPUBone's ancestor, of the same blocks under the same names (timm's two modules are copies), so the
same mirrors (cpubone.py): conv layers, fused MBConvs and MBConvs with their input added where
they keep the stride, a stem at stride 2 and two convolutional stages, then two stages that start
with a strided block and go on with LowFormer blocks: a one-group norm and a convolutional
attention, the norm and a 1x1 MLP, the local conv block, each plus its input (E1 and E2 have the
local block alone, E3 no MLP). The attention makes each head's query, key and value with a
depthwise conv-norm (5x5 at stride 2 from stride 16: one token per 32-pixel patch; 3x3 at stride 1
at stride 32) and a 1x1, lets each visible token attend to its image's visible tokens, and upsamples
with a learned transposed convolution that folds the output projection in (4x4 at stride 2, 3x3
at stride 1: ``sparse.transposed_conv``), whose windows reach into the neighbouring patches as a
convolution's do. timm's classifier head (1x1 conv, pooling, linear, layer norm) is kept, frozen.
"""

from __future__ import annotations

from timm.models.lowformer import (ConvAttention, ConvLayer, FusedMBConv, LowFormer, LowFormerBlock, MBConv,
                                   ResidualBlock)

from .cpubone import (MirrorConvAttention, MirrorConvLayer, MirrorFusedMBConv, MirrorMBConv,
                      MirrorResidualBlock)
from ..family import Family
from ..layouts import NamedStages
from ..mirrors import MirrorInOrder
from ..refusals import CheckpointingRefused


class MirrorLowFormerBlock(MirrorInOrder):
    """Attention, MLP and local block, each an identity where the model has none (E1, E2, E3)."""

    children_names = ("attn", "mlp", "local")


LOWFORMER = Family(
    name="lowformer",
    timm_class=LowFormer,
    mirrors={ConvLayer: MirrorConvLayer, FusedMBConv: MirrorFusedMBConv, MBConv: MirrorMBConv,
             LowFormerBlock: MirrorLowFormerBlock, ResidualBlock: MirrorResidualBlock,
             ConvAttention: MirrorConvAttention},
    layout=NamedStages(("stem",), ("stages.0", "stages.1", "stages.2", "stages.3")),
    kept=("in_conv", "pre_classifier"),
    norm_acts={MirrorConvLayer: (("norm", "act"),)},
    check=CheckpointingRefused("stages"),
)
