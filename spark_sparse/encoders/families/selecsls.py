"""The SelecSLS family (timm ``selecsls``: SelecSLS-42, -42b, -60, -60b, -84, XNect's backbones).

A plain ReLU convnet of conv-norm-ReLUs: a 3x3 stride-2 stem, then blocks of a 3x3 (striding in a
stage's first block), 1x1, 3x3, 1x1, 3x3 chain whose three 3x3 outputs are concatenated, with the
stage's first block's output beside them in every later block (timm passes ``[x, skip]`` lists
from block to block), and a 1x1 mixing them. The head's first two conv-norm-ReLUs (3x3 stride 2,
3x3) make the stride-32 feature, as timm's feature taps; its last two (stride 64) never run: kept,
frozen. The stages are no chain of single-tensor modules, so ``selecsls_features`` runs timm's flow
on the timm model and the converted body alike.
"""

from __future__ import annotations

from timm.models.selecsls import SelecSls, SelecSlsBlock, SequentialList
from torch import nn

from ..family import Family
from ..layouts import STRIDES, Layout
from ..leaves import ChannelConcat
from ..mirrors import Converter, MirrorChildren, MirrorSequential


class MirrorSelecSlsBlock(MirrorChildren):
    """conv1 .. conv6 (conv-norm-ReLU Sequentials) on timm's ``[x, skip]`` lists: a stage's first
    block (``is_first``) makes its output the skip of the blocks after it."""

    children_names = ("conv1", "conv2", "conv3", "conv4", "conv5", "conv6")

    def __init__(self, block: SelecSlsBlock, convert: Converter, path: str):
        super().__init__(block, convert, path)
        self.is_first = block.is_first
        self.concat = convert.leaf(ChannelConcat(), f"{path}.concat")  # parameter-free, a name timm's lacks

    def forward(self, x: list) -> list:
        d1 = self.conv1(x[0])
        d2 = self.conv3(self.conv2(d1))
        d3 = self.conv5(self.conv4(d2))
        if self.is_first:
            out = self.conv6(self.concat(d1, d2, d3))
            return [out, out]
        return [self.conv6(self.concat(d1, d2, d3, x[1])), x[1]]


# the head's conv-norm-ReLUs that make the stride-32 feature; the rest of it runs at stride 64
HEAD_AT_32 = 2


def selecsls_features(net: nn.Module, x) -> list:
    """The stem, the blocks (a stage ends before the next stage's first block) and the head's first
    two layers, on a timm SelecSLS or its converted body (the same names): timm's taps at strides 4
    to 32."""
    x = [net.stem(x)]
    blocks = list(net.features)
    feats = []
    for i, block in enumerate(blocks):
        x = block(x)
        if i + 1 == len(blocks) or blocks[i + 1].is_first:
            feats.append(x[0])
    y = feats[-1]
    for layer in list(net.head)[:HEAD_AT_32]:
        y = layer(y)
    return feats + [y]


def selecsls_layout(model: SelecSls) -> Layout:
    """Every module the features use; the channels of timm's taps at strides 4 to 32."""
    taps = {i["reduction"]: i["num_chs"] for i in model.feature_info}
    return Layout(("stem",), (("features",), (), (), tuple(f"head.{i}" for i in range(HEAD_AT_32))),
                  tuple(taps[s] for s in STRIDES))


SELECSLS = Family(
    name="selecsls",
    timm_class=SelecSls,
    mirrors={SelecSlsBlock: MirrorSelecSlsBlock, SequentialList: MirrorSequential},
    layout=selecsls_layout,
    kept=("head.2", "head.3"),
    features=selecsls_features,
)
