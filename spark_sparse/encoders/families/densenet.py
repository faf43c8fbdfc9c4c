"""The DenseNet family (timm ``DenseNet``: DenseNet-121/161/169/201/264d, deep stems).

A dense block's every layer reads the concatenation of the block's input and all earlier layers'
outputs (pre-activation: norm + ReLU, 1x1, norm + ReLU, 3x3) and adds ``growth_rate`` channels to
it; a transition (norm + ReLU, 1x1, 2x2 average pooling) halves width and map between blocks.
The body is one Sequential ``features``: the stem runs up to the stride-2 tap (the stem's norm), a
stage ends at timm's feature tap at its stride (a dense block; the last stage ends with ``norm5``).
"""

from __future__ import annotations

from timm.models.densenet import DenseBlock, DenseLayer, DenseNet, DenseTransition
from torch import nn

from ..family import Family
from ..layouts import ChildStages
from ..mirrors import Converter, MirrorRunningConcat, MirrorSequential
from ..refusals import unsupported


class MirrorDenseLayer(nn.Module):
    """timm's DenseLayer on the concatenation it is given: norm1, conv1, norm2, conv2."""

    def __init__(self, layer: DenseLayer, convert: Converter, path: str):
        super().__init__()
        for name in ("norm1", "conv1", "norm2", "conv2"):
            setattr(self, name, convert.leaf(getattr(layer, name), f"{path}.{name}"))

    def forward(self, x):
        return self.conv2(self.norm2(self.conv1(self.norm1(x))))


def _check(model: nn.Module) -> None:
    for path, module in model.named_modules():
        if isinstance(module, DenseLayer):
            if module.grad_checkpointing:
                raise unsupported(module, path, "memory-efficient (checkpointed) layers are not mirrored; "
                                                "set memory_efficient=False")
            if module.drop_rate > 0:
                raise unsupported(module, path, f"dropout p={module.drop_rate} after the layer "
                                                "(proj_drop_rate) is not mirrored; set it to 0")


DENSENET = Family(
    name="densenet",
    timm_class=DenseNet,
    mirrors={DenseBlock: MirrorRunningConcat, DenseLayer: MirrorDenseLayer, DenseTransition: MirrorSequential},
    layout=ChildStages(),
    check=_check,
)
