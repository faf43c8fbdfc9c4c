"""The CPUBone family (timm ``cpubone``: nano, T0, S0, B0-B3; CVPR 2026 Findings, a backbone for
devices with little parallelism).

Conv layers (a convolution, an optional batch norm, an optional activation) build every block: fused
MBConvs (a grouped 3x3 that may stride, then a 1x1) and MBConvs (1x1, depthwise, 1x1), with their input
added where they keep the stride. The two convolutional stages are such blocks; the two later ones
start with a strided one, then CPUBone blocks: a one-group norm and a convolutional attention, the
norm and a 1x1 MLP, the local conv block, each plus its input. The attention makes each head's query,
key and value with a depthwise 2x2 (stride 2 at stride 16: one token per 32-pixel patch; stride 1 at
stride 32) and a 1x1, lets each visible token attend to its image's visible tokens
(``attention.PackedQkvAttention``), projects and, at stride 16, repeats each token over its patch's
2x2 sites (nearest upsampling; timm's learned one, which no released model has, is a transposed
convolution: ``sparse.transposed_conv``). The 2x2 kernels at stride 1 read the site and those above
and left of it (timm's zero pad before them: one ``ZeroPaddedConv2d`` leaf). The MLP's dropout (0.1
by default) runs on the visible rows. timm's classifier head (1x1 conv, pooling, linears) is kept,
frozen.
"""

from __future__ import annotations

from timm.models.cpubone import (ConvAttention, ConvLayer, CPUBone, CPUBoneBlock, FusedMBConv, MBConv,
                                 ResidualBlock)
from torch import nn

from ..attention import PackedQkvAttention
from ..family import Family
from ..layouts import NamedStages
from ..mirrors import Converter, MirrorInOrder
from ..refusals import CheckpointingRefused, unsupported


class MirrorConvLayer(MirrorInOrder):
    """A convolution (timm's zero pad and a 2x2 one where it has one), [batch norm], [activation]."""

    children_names = ("conv", "norm", "act")


class MirrorFusedMBConv(MirrorInOrder):
    children_names = ("spatial_conv", "point_conv")


class MirrorMBConv(MirrorInOrder):
    children_names = ("inverted_conv", "depth_conv", "point_conv")


class MirrorCPUBoneBlock(MirrorInOrder):
    children_names = ("total",)


class MirrorResidualBlock(nn.Module):
    """``main``, then drop path plus the input where timm's block has a shortcut (an identity)."""

    def __init__(self, block: ResidualBlock, convert: Converter, path: str):
        super().__init__()
        if block.shortcut is not None and type(block.shortcut) is not nn.Identity:
            raise unsupported(block.shortcut, f"{path}.shortcut", "a shortcut other than the identity")
        self.main = convert(block.main, f"{path}.main")
        self.has_shortcut = block.shortcut is not None
        self.drop_path = convert.leaf(block.drop_path, f"{path}.drop_path")

    def forward(self, x):
        return self.drop_path(self.main(x)) + x if self.has_shortcut else self.main(x)


class MirrorConvAttention(nn.Module):
    """q, k and v of each head from a depthwise conv-norm and a 1x1, attention of each visible token
    over its image's visible tokens, the output projection, [upsampling to the input's sites: nearest,
    or learned, a transposed convolution that may fold the projection in]."""

    def __init__(self, module: ConvAttention, convert: Converter, path: str):
        super().__init__()
        self.conv_proj = convert(module.conv_proj, f"{path}.conv_proj")
        self.pwise = convert.leaf(module.pwise, f"{path}.pwise")
        # parameter-free, a name timm's module lacks
        self.attention = convert.leaf(PackedQkvAttention(module.num_heads, module.head_dim), f"{path}.attention")
        self.o_proj = convert.leaf(module.o_proj, f"{path}.o_proj")
        self.upsampling = convert(module.upsampling, f"{path}.upsampling")

    def forward(self, x):
        # timm crops the upsampled map to the input's size: on whole patches it fits already
        return self.upsampling(self.o_proj(self.attention(self.pwise(self.conv_proj(x)))))


CPUBONE = Family(
    name="cpubone",
    timm_class=CPUBone,
    mirrors={ConvLayer: MirrorConvLayer, FusedMBConv: MirrorFusedMBConv, MBConv: MirrorMBConv,
             CPUBoneBlock: MirrorCPUBoneBlock, ResidualBlock: MirrorResidualBlock, ConvAttention: MirrorConvAttention},
    layout=NamedStages(("stem",), ("stages.0", "stages.1", "stages.2", "stages.3")),
    kept=("head",),
    norm_acts={MirrorConvLayer: (("norm", "act"),)},
    check=CheckpointingRefused("stages"),
)
