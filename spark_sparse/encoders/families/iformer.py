"""The iFormer family (timm ``iformer``: iFormer-T .. -H and the distilled M, L, L2; ICLR 2025's
mobile hybrid).

Conv-norms everywhere (timm's ``ConvNorm``: a convolution and its batch norm), each mixer in a
``Residual`` (x + gamma * drop_path(mixer(x))): ConvNeXt-like conv blocks (a depthwise kxk, 1x1s with
GELU between), FFNs, conditional position encodings (a depthwise conv-norm plus its input) and, in
the last stages, single-head modulation attention (SHMA): q and k from 1x1 conv-norms, v and a gate
from one 1x1 conv-norm through a sigmoid, one head of softmax attention over the image's tokens
(here its visible ones: ``attention.GroupedQueryAttention`` with one head), times the gate, a 1x1
conv-norm. A stem of two 5x5 stride-2 conv-norms with GELU and a 1x1; 3x3 stride-2 conv-norms
start the later stages. timm's RepViT classifier is the head: kept, frozen.
"""

from __future__ import annotations

from timm.models.iformer import (ConvBlock, ConvNorm, FFN, IFormer, RepCPE, Residual, SHMA, SHMABlock, StageBlock,
                                 Stem)
from ..attention import GroupedQueryAttention
from ..family import Family
from ..layouts import NamedStages
from ..leaves import ChannelSplit, Product
from ..mirrors import (Converter, MirrorChildren, MirrorDownsampleBlocks, MirrorInOrder, MirrorSequential,
                       mirror_layer_scale)
from ..refusals import CheckpointingRefused, unsupported


class MirrorResidual(MirrorChildren):
    """x + gamma * drop_path(module(x)) (gamma, timm's layer scale, where the block has one)."""

    children_names = ("module", "drop_path")

    def __init__(self, block: Residual, convert: Converter, path: str):
        super().__init__(block, convert, path)
        mirror_layer_scale(self, block, convert, path)

    def forward(self, x):
        y = self.drop_path(self.module(x))
        return x + (y if self.gamma is None else self.scale(y, self.gamma.view(-1)))


class MirrorMixer(MirrorInOrder):
    """A block that is its ``mixer`` (a Residual): ConvBlock, FFN, SHMABlock."""

    children_names = ("mixer",)


class MirrorRepCPE(MirrorInOrder):
    """The conditional position encoding: its ``cpe`` (a Residual of a depthwise conv-norm)."""

    children_names = ("cpe",)


class MirrorStem(MirrorInOrder):
    children_names = ("conv1", "act1", "conv2", "act2", "conv3")


class MirrorSHMA(MirrorChildren):
    """q, k and the sigmoid of v_gate (split into v and the gate) per site, one head of attention of
    each visible query over its image's visible keys, times the gate, proj."""

    children_names = ("q", "k", "v_gate", "gate_act", "proj")
    dropouts = ("attn_drop",)

    def __init__(self, module: SHMA, convert: Converter, path: str):
        if module.window_size:
            raise unsupported(module, path, f"attention within windows of {module.window_size} sites")
        super().__init__(module, convert, path)
        key_dim, value_dim = module.q.c.out_channels, module.v_gate.c.out_channels // 2
        # parameter-free leaves under names timm's module lacks
        self.attention = convert.leaf(GroupedQueryAttention(1, key_dim, value_dim), f"{path}.attention")
        self.split = convert.leaf(ChannelSplit(value_dim), f"{path}.split")
        self.product = convert.leaf(Product(), f"{path}.product")

    def forward(self, x):
        v, gate = self.split(self.gate_act(self.v_gate(x)))
        return self.proj(self.product(self.attention(self.q(x), self.k(x), v), gate))


IFORMER = Family(
    name="iformer",
    timm_class=IFormer,
    mirrors={ConvNorm: MirrorSequential, Residual: MirrorResidual, ConvBlock: MirrorMixer, FFN: MirrorMixer,
             SHMABlock: MirrorMixer, RepCPE: MirrorRepCPE, SHMA: MirrorSHMA, Stem: MirrorStem,
             StageBlock: MirrorDownsampleBlocks},
    layout=NamedStages(("stem",), ("stages.0", "stages.1", "stages.2", "stages.3")),
    kept=("head",),
    check=CheckpointingRefused("stages"),
)
