"""The FasterNet family (timm ``FasterNet``: T0-T2, S, M, L, "Run, Don't Walk").

A block mixes space with a partial convolution (a 3x3 over the first quarter of the channels,
the rest passed through: a split and a concatenation), then a 1x1 MLP with a batch norm inside,
[a layer scale], drop path, plus its input. The stem is a 4x4 patchify convolution and its norm,
each later stage starts with a 2x2 patch merging (convolution and norm). timm's ``conv_head``
runs on the pooled vector in the classifier head: kept (frozen, never run) for strict loading.
"""

from __future__ import annotations

from timm.models.fasternet import Block, FasterNet, MLPBlock, Partial_conv3, PatchEmbed, PatchMerging
from torch import nn

from ..family import Family
from ..layouts import NamedStages
from ..leaves import ChannelConcat, ChannelSplit
from ..mirrors import Converter, MirrorDownsampleBlocks, mirror_layer_scale
from ..refusals import CheckpointingRefused


class MirrorPartialConv(nn.Module):
    """timm's Partial_conv3 (either of its forwards): its first channels convolved, the rest kept."""

    def __init__(self, module: Partial_conv3, convert: Converter, path: str):
        super().__init__()
        self.partial_conv3 = convert.leaf(module.partial_conv3, f"{path}.partial_conv3")
        # parameter-free leaves under names timm's module does not use
        self.split = convert.leaf(ChannelSplit(module.dim_conv3), f"{path}.split")
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat")

    def forward(self, x):
        first, rest = self.split(x)
        return self.concat(self.partial_conv3(first), rest)


class MirrorMLPBlock(nn.Module):
    """timm's MLPBlock: spatial mixing, the MLP, [layer scale], drop path, + the block's input."""

    def __init__(self, block: MLPBlock, convert: Converter, path: str):
        super().__init__()
        self.spatial_mixing = convert(block.spatial_mixing, f"{path}.spatial_mixing")
        self.mlp = convert(block.mlp, f"{path}.mlp")
        mirror_layer_scale(self, block, convert, path, name="layer_scale")
        self.drop_path = convert.leaf(block.drop_path, f"{path}.drop_path")

    def forward(self, x):
        y = self.mlp(self.spatial_mixing(x))  # the block adds its input, not the mixed map
        if self.scale is not None:
            y = self.scale(y, self.layer_scale)
        return x + self.drop_path(y)


class MirrorConvNorm(nn.Module):
    """timm's PatchEmbed (``proj``, ``norm``) or PatchMerging (``reduction``, ``norm``)."""

    def __init__(self, module: nn.Module, convert: Converter, path: str):
        super().__init__()
        self.conv_name = "proj" if isinstance(module, PatchEmbed) else "reduction"
        setattr(self, self.conv_name, convert.leaf(getattr(module, self.conv_name), f"{path}.{self.conv_name}"))
        self.norm = convert.leaf(module.norm, f"{path}.norm")

    def forward(self, x):
        return self.norm(getattr(self, self.conv_name)(x))


FASTERNET = Family(
    name="fasternet",
    timm_class=FasterNet,
    mirrors={Block: MirrorDownsampleBlocks, MLPBlock: MirrorMLPBlock, Partial_conv3: MirrorPartialConv,
             PatchEmbed: MirrorConvNorm, PatchMerging: MirrorConvNorm},
    layout=NamedStages(("patch_embed",), ("stages.0", "stages.1", "stages.2", "stages.3")),
    kept=("conv_head",),
    check=CheckpointingRefused("stages"),
)
