"""The StarNet family (timm ``StarNet``: S050, S100, S150 and S1-S4, "Rewrite the Stars").

A block is a depthwise 7x7 conv-norm, two 1x1 branches (f1, f2), the "star": act(f1) times f2,
a 1x1 conv-norm (g) back to the block's width, a depthwise 7x7 with a bias, drop path, plus its
input. A stage is a strided 3x3 conv-norm then its blocks; the stem a strided 3x3 conv-norm and
ReLU6. timm's ``forward_features`` ends with a batch norm: it ends the last stage.
"""

from __future__ import annotations

from timm.models.starnet import Block, ConvBN, StarNet

from ..family import Family
from ..layouts import NamedStages
from ..leaves import Product
from ..mirrors import Converter, MirrorChildren, MirrorSequential
from ..refusals import CheckpointingRefused


class MirrorStarBlock(MirrorChildren):
    """timm's StarNet Block: dwconv, f1 and f2, act(f1) * f2, g, dwconv2, drop path, + input."""

    children_names = ("dwconv", "f1", "f2", "act", "g", "dwconv2", "drop_path")

    def __init__(self, block: Block, convert: Converter, path: str):
        super().__init__(block, convert, path)
        self.star = convert.leaf(Product(), f"{path}.star")  # parameter-free, a name timm's block lacks

    def forward(self, x):
        y = self.dwconv(x)
        y = self.star(self.act(self.f1(y)), self.f2(y))
        return self.drop_path(self.dwconv2(self.g(y))) + x


STARNET = Family(
    name="starnet",
    timm_class=StarNet,
    mirrors={Block: MirrorStarBlock, ConvBN: MirrorSequential},
    layout=NamedStages(("stem",), ("stages.0", "stages.1", "stages.2", "stages.3"), head=("norm",)),
    check=CheckpointingRefused("stages"),
)
