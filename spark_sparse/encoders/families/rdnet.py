"""The RDNet family (timm ``RDNet``: tiny, small, base, large, "DenseNets Reloaded").

A dense stage's every block reads the concatenation of the stage's input and all earlier blocks'
outputs (a depthwise 7x7, a layer norm, a 1x1 MLP with GELU, [effective SE]), scales it by a
layer scale and adds ``growth_rate`` channels to it. A transition (layer norm, then a 1x1 or a
2x2 stride-2 convolution) starts each stage after the first; the stem is a 4x4 patchify
convolution (or two 3x3 stride-2 ones) and a layer norm. timm's head norm (``head.norm``) runs on
the pooled vector: kept (frozen, never run) for strict loading.
"""

from __future__ import annotations

from timm.models.rdnet import Block, BlockESE, DenseBlock, DenseStage, RDNet
from torch import nn

from ..family import Family
from ..layouts import ChildStages
from ..mirrors import Converter, MirrorRunningConcat, mirror_layer_scale
from ..refusals import CheckpointingRefused, unsupported


class MirrorDenseBlock(nn.Module):
    """timm's DenseBlock on the concatenation it is given: its layers, [layer scale], drop path."""

    def __init__(self, block: DenseBlock, convert: Converter, path: str):
        super().__init__()
        if block.drop_rate > 0:
            raise unsupported(block, path, f"dropout p={block.drop_rate} after the block (proj_drop_rate) is not "
                                           "mirrored; set it to 0")
        self.layers = convert(block.layers, f"{path}.layers")
        mirror_layer_scale(self, block, convert, path)
        self.drop_path = convert.leaf(block.drop_path, f"{path}.drop_path")

    def forward(self, x):
        x = self.layers(x)
        if self.gamma is not None:
            x = self.scale(x, self.gamma)
        return self.drop_path(x)


class MirrorBlock(nn.Module):
    """timm's rdnet Block and BlockESE: their Sequential ``layers``."""

    def __init__(self, block: nn.Module, convert: Converter, path: str):
        super().__init__()
        self.layers = convert(block.layers, f"{path}.layers")

    def forward(self, x):
        return self.layers(x)


RDNET = Family(
    name="rdnet",
    timm_class=RDNet,
    mirrors={DenseStage: MirrorRunningConcat, DenseBlock: MirrorDenseBlock, Block: MirrorBlock, BlockESE: MirrorBlock},
    layout=ChildStages(body="dense_stages", stem=("stem",), head=("norm_pre",)),
    kept=("head.norm",),
    check=CheckpointingRefused("dense_stages"),
)
