"""The ConvNeXt family (timm ``ConvNeXt``: V1 and V2, ``conv_mlp`` or not, layer scale or not).

A block is depthwise 7x7 -> layer norm -> MLP (fc1, GELU, [GRN], fc2) -> layer scale ->
drop path, plus its input; a stage is an optional downsampling (layer norm, 2x2 stride-2
convolution) and its blocks. The classifier head's norm is kept (frozen, never run) so that
exported weights load strictly into ``timm.create_model(name, num_classes=0)``.
"""

from __future__ import annotations

from timm.models.convnext import ConvNeXt, ConvNeXtBlock, ConvNeXtStage
from timm.layers import GlobalResponseNormMlp, Mlp
from torch import nn

from ..family import Family
from ..layouts import NamedStages
from ..mirrors import Converter, MirrorDownsampleBlocks, mirror_layer_scale
from ..refusals import unsupported


def _reject_dropout(module: nn.Module, path: str) -> None:
    for name, sub in module.named_children():
        if isinstance(sub, nn.Dropout) and sub.p > 0:
            raise unsupported(sub, f"{path}.{name}", f"dropout p={sub.p} inside the MLP")


class MirrorMlp(nn.Module):
    """timm's Mlp / GlobalResponseNormMlp: fc1, act, [norm or GRN], fc2 (dropout must be 0)."""

    def __init__(self, mlp: nn.Module, convert: Converter, path: str):
        super().__init__()
        _reject_dropout(mlp, path)
        self.fc1 = convert.leaf(mlp.fc1, f"{path}.fc1")
        self.act = convert.leaf(mlp.act, f"{path}.act")
        # Mlp names its optional middle norm `norm`, GlobalResponseNormMlp its GRN `grn`
        self.mid = "grn" if hasattr(mlp, "grn") else "norm"
        setattr(self, self.mid, convert.leaf(getattr(mlp, self.mid), f"{path}.{self.mid}"))
        self.fc2 = convert.leaf(mlp.fc2, f"{path}.fc2")

    def forward(self, x):
        return self.fc2(getattr(self, self.mid)(self.act(self.fc1(x))))


class MirrorConvNeXtBlock(nn.Module):
    def __init__(self, block: ConvNeXtBlock, convert: Converter, path: str):
        super().__init__()
        if not isinstance(block.shortcut, nn.Identity):
            raise unsupported(block.shortcut, f"{path}.shortcut", "a block that changes width or stride")
        self.conv_dw = convert.leaf(block.conv_dw, f"{path}.conv_dw")
        self.norm = convert.leaf(block.norm, f"{path}.norm")
        self.mlp = convert(block.mlp, f"{path}.mlp")
        mirror_layer_scale(self, block, convert, path)
        self.drop_path = convert.leaf(block.drop_path, f"{path}.drop_path")

    def forward(self, x):
        shortcut = x
        x = self.mlp(self.norm(self.conv_dw(x)))
        if self.gamma is not None:
            x = self.scale(x, self.gamma)
        return self.drop_path(x) + shortcut


def _check(model: nn.Module) -> None:
    if getattr(model, "grad_checkpointing", False) or any(
            getattr(s, "grad_checkpointing", False) for s in model.stages):
        raise unsupported(model, "stages", "gradient checkpointing is not mirrored; turn it off")


CONVNEXT = Family(
    name="convnext",
    timm_class=ConvNeXt,
    mirrors={ConvNeXtStage: MirrorDownsampleBlocks, ConvNeXtBlock: MirrorConvNeXtBlock,
             Mlp: MirrorMlp, GlobalResponseNormMlp: MirrorMlp},
    layout=NamedStages(("stem",), ("stages.0", "stages.1", "stages.2", "stages.3")),
    kept=("norm_pre", "head.norm", "head.pre_logits"),
    check=_check,
)
