"""The PP-LCNetV2 family (timm ``LCNetV2``: ``lcnetv2_small``, ``_base``, ``_large``).

Every block is a depthwise separable convolution: a depthwise conv-norm-ReLU (3x3 or 5x5, strided
in a stage's first block), an optional SE over each image's visible sites, a 1x1 conv-norm-ReLU (or
two in a row), plus its input where the shapes match. In the later stages the depthwise convolution
is re-parameterisable: at train time depthwise 5x5, 3x3 (and, at stride 1, 1x1) conv-norms summed
over the same visible sites, then the ReLU; re-parameterised (timm's ``reparameterize``) one
depthwise 5x5 with a bias. The stem is a 3x3 stride-2 conv-norm-ReLU on the pixels and one such
block at stride 2. The 1x1 ``conv_head`` runs after pooling and is kept, frozen.
"""

from __future__ import annotations

from timm.layers import ConvNormAct
from timm.models.lcnetv2 import LCNetV2, RepDepthwiseSeparable
from torch import nn

from ..family import Family
from ..layouts import NamedStages
from ..mirrors import Converter, MirrorConvNormAct
from ..refusals import CheckpointingRefused


class MirrorRepDepthwiseSeparable(nn.Module):
    """dw_act(dw_conv(x), or the sum of the dw_conv_list branches), se, pw_conv, [+ x]."""

    def __init__(self, block: RepDepthwiseSeparable, convert: Converter, path: str):
        super().__init__()
        self.dw_conv = convert(block.dw_conv, f"{path}.dw_conv")
        self.dw_conv_list = None if block.dw_conv_list is None else nn.ModuleList(
            convert(branch, f"{path}.dw_conv_list.{i}") for i, branch in enumerate(block.dw_conv_list))
        for name in ("dw_act", "se", "pw_conv"):
            setattr(self, name, convert(getattr(block, name), f"{path}.{name}"))
        self.use_shortcut = block.use_shortcut

    def forward(self, x):
        if self.dw_conv is not None:
            y = self.dw_conv(x)
        else:
            y = self.dw_conv_list[0](x)
            for branch in self.dw_conv_list[1:]:
                y = y + branch(x)
        y = self.pw_conv(self.se(self.dw_act(y)))
        return y + x if self.use_shortcut else y


LCNETV2 = Family(
    name="lcnetv2",
    timm_class=LCNetV2,
    mirrors={RepDepthwiseSeparable: MirrorRepDepthwiseSeparable, ConvNormAct: MirrorConvNormAct},
    layout=NamedStages(("stem",), ("stages.0", "stages.1", "stages.2", "stages.3")),
    kept=("conv_head",),  # a 1x1 convolution after pooling, kept (frozen, never run) for strict loading
    check=CheckpointingRefused("stages"),
)
