"""The FocalNet family (timm ``FocalNet``: Focal Modulation Networks, ``focalnet_tiny_srf`` ..
``focalnet_huge_fl4``): a transformer's shape with attention replaced by convolutions.

A block is norm1 -> focal modulation -> [norm1_post] -> layer scale -> drop path, plus its input,
then the same with a 1x1 MLP (fc1, GELU, fc2); the ``_post`` norms (large models) stand in for
the first ones. Focal modulation: a 1x1 ``f`` gives, per site, a query q, a context and L + 1
gates; L depthwise convolutions with GELU (kernels 3, 5, ... or 5, 7, ...) refine the context in
turn, each level weighted by its gate, and the last level's mean over each image's visible sites
(timm's mean over the map: over the visible part, as SE's squeeze, so features stay
canvas-invariant) through GELU is the global level, weighted by the last gate. The sum goes through
a 1x1 ``h`` and multiplies q; a norm (huge models), then the 1x1 ``proj``. The context and the
gates carry ``f``'s bias to hidden sites: the dense-masked engine masks the context before each
depthwise convolution reads it, and a product is zero where either factor is. The stem is a 4x4
stride-4 patchify (or a 7x7 stride-4 convolution padded 2) and a layer norm, each later stage
begins with a 2x2 (or 3x3) stride-2 convolution and a layer norm. The final layer norm runs before
pooling, so it ends the last stage.
"""

from __future__ import annotations

import copy

from timm.layers import LayerScale2d, Mlp
from timm.models.focalnet import Downsample, FocalModulation, FocalNet, FocalNetBlock, FocalNetStage
from torch import nn

from .convnext import MirrorMlp
from ..family import Family
from ..layouts import NamedStages
from ..leaves import ChannelSplit, GatedImageVector, ImageMean, Product, Scale, split_in_turn
from ..mirrors import Converter, MirrorChildren, MirrorInOrder, MirrorLayerScale
from ..refusals import CheckpointingRefused, refuse_dropout


class MirrorDownsample(MirrorInOrder):
    """The stem and each later stage's first layers: the strided convolution, then its norm."""

    children_names = ("proj", "norm")


class MirrorFocalModulation(nn.Module):
    """timm's FocalModulation: its children under timm's names, the split, products, global mean
    and normalisation as parameter-free leaves under names it does not use."""

    def __init__(self, module: FocalModulation, convert: Converter, path: str):
        super().__init__()
        refuse_dropout(module, path, "proj_drop")
        levels = module.focal_level
        for name in ("f", "h", "norm", "proj"):
            setattr(self, name, convert.leaf(getattr(module, name), f"{path}.{name}"))
        self.focal_layers = nn.ModuleList(convert(layer, f"{path}.focal_layers.{i}")
                                          for i, layer in enumerate(module.focal_layers))
        # the global level's activation acts on a (B, C) vector per image: timm's module, in both engines
        self.act = copy.deepcopy(module.act)
        # q, the context, then one gate per level and the global one
        self.splits = nn.ModuleList(convert.leaf(ChannelSplit(first), f"{path}.splits.{i}")
                                    for i, first in enumerate([module.dim, module.dim] + [1] * levels))
        self.gated = nn.ModuleList(convert.leaf(Product(), f"{path}.gated.{i}") for i in range(levels))
        self.mean = convert.leaf(ImageMean(), f"{path}.mean")
        self.gated_global = convert.leaf(GatedImageVector(), f"{path}.gated_global")
        self.normalize = (convert.leaf(Scale(1 / (levels + 1)), f"{path}.normalize")
                          if module.normalize_modulator else None)
        self.modulated = convert.leaf(Product(), f"{path}.modulated")

    def forward(self, x):
        q, ctx, *gates = split_in_turn(self.splits, self.f(x))
        ctx_all = None
        for layer, gated, gate in zip(self.focal_layers, self.gated, gates):
            ctx = layer(ctx)
            level = gated(ctx, gate)
            ctx_all = level if ctx_all is None else ctx_all + level
        ctx_all = ctx_all + self.gated_global(gates[-1], self.act(self.mean(ctx)))
        if self.normalize is not None:
            ctx_all = self.normalize(ctx_all)
        return self.proj(self.norm(self.modulated(q, self.h(ctx_all))))


class MirrorFocalNetBlock(MirrorChildren):
    """x + drop_path1(ls1(norm1_post(modulation(norm1(x))))), then the same with the MLP (each
    norm an identity where the model has none)."""

    children_names = ("norm1", "modulation", "norm1_post", "ls1", "drop_path1",
                      "norm2", "mlp", "norm2_post", "ls2", "drop_path2")

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.norm1_post(self.modulation(self.norm1(x)))))
        return x + self.drop_path2(self.ls2(self.norm2_post(self.mlp(self.norm2(x)))))


class MirrorFocalNetStage(nn.Module):
    """A stage: ``downsample`` (an identity in the first), then its blocks (timm's ModuleList)."""

    def __init__(self, stage: FocalNetStage, convert: Converter, path: str):
        super().__init__()
        self.downsample = convert(stage.downsample, f"{path}.downsample")
        self.blocks = nn.Sequential(*(convert(block, f"{path}.blocks.{i}") for i, block in enumerate(stage.blocks)))

    def forward(self, x):
        return self.blocks(self.downsample(x))


FOCALNET = Family(
    name="focalnet",
    timm_class=FocalNet,
    mirrors={Downsample: MirrorDownsample, FocalNetStage: MirrorFocalNetStage, FocalNetBlock: MirrorFocalNetBlock,
             FocalModulation: MirrorFocalModulation, Mlp: MirrorMlp, LayerScale2d: MirrorLayerScale},
    layout=NamedStages(("stem",), ("layers.0", "layers.1", "layers.2", "layers.3"), head=("norm",)),
    kept=("head.norm", "head.pre_logits"),
    check=CheckpointingRefused("layers"),
)
