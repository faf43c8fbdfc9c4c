"""What a timm model family tells the shared encoder: its blocks, stem, stages and refusals.

Every engine builds its encoder by walking a timm model and swapping each leaf module
(convolution, norm, activation, pooling, drop-path, ...) for its own twin; the blocks and the
stage layout are mirrored by the family's classes and keep timm's module names, so weights map
one-to-one. A family module (families/resnet.py, families/convnext.py) defines a ``Family`` and its mirror
blocks, from the shared parts: ``refusals.py`` (what no engine mirrors), ``leaves.py`` (engine-neutral
leaves and the leaf types engines convert), ``mirrors.py`` (the converter and shared mirror
containers), ``layouts.py`` (stems, stages and strides); the input sizes a model runs at are here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import timm
import torch
from torch import nn

from .layouts import PATCH, STRIDES, Layout, StemPool, check_scales
from .mirrors import Converter, LeafConverter, frozen_copy
from .refusals import unsupported


def no_check(model: nn.Module) -> None:
    """Families without refusals beyond those of their leaves and blocks."""


@dataclass(frozen=True)
class InputSizes:
    """The input sizes a model's encoders run at: multiples of ``multiple``, up to ``largest`` (None:
    any), each limit with why it is there (a pretraining config off them fails before any work)."""

    multiple: int = PATCH  # the mask's patch: any whole number of patches
    why_multiple: str = ""
    largest: int | None = None
    why_largest: str = ""

    def refusal(self, model: str, size: int) -> str | None:
        """The one-line reason ``model`` cannot run at ``size``, or None where it can."""
        if self.largest == self.multiple and size != self.multiple:
            return f"model {model} {self.why_multiple}: input_size must be {self.multiple}, got {size}"
        if size % self.multiple:
            return f"model {model} {self.why_multiple}: input_size must be a multiple of {self.multiple}, got {size}"
        if self.largest is not None and size > self.largest:
            return f"model {model} {self.why_largest}: input_size must be at most {self.largest}, got {size}"
        return None

    def fit(self, size: int) -> int:
        """The least input size from ``size`` up that the model runs at (its own, where it has one)."""
        fitted = -(-size // self.multiple) * self.multiple
        return fitted if self.largest is None else min(fitted, self.largest)


def any_input_size(name: str) -> InputSizes:
    """A family whose models run at any whole number of patches."""
    return InputSizes()


def normed_stage_outputs(timm_class: type, stem: str, stages: str = "stages") -> Callable[[nn.Module, Any], list]:
    """``Family.features`` of a family whose features are its stages' outputs, the last through the
    final ``norm``: timm's ``forward_intermediates(norm=True)`` on a ``timm_class`` model (maps, not
    tokens), the same flow on the converted body (``stem``, ``stages``, ``norm``: timm's names)."""
    def features(net: nn.Module, x) -> list:
        if isinstance(net, timm_class):
            return net.forward_intermediates(x, norm=True, intermediates_only=True)
        x = getattr(net, stem)(x)
        feats = []
        for stage in getattr(net, stages):
            x = stage(x)
            feats.append(x)
        feats[-1] = net.norm(x)
        return feats
    return features


def meta_model(name: str) -> nn.Module:
    """timm's model ``name`` on the meta device: its modules and shapes, no weights made."""
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=0)


def input_shapes(model: nn.Module, modules: Sequence[nn.Module], size: int) -> list[tuple[nn.Module, torch.Size]]:
    """Each call of one of ``modules`` in a forward of the meta ``model`` at ``size`` px, with the
    shape of its first input (where its map's stride is read from the shapes alone)."""
    seen: list[tuple[nn.Module, torch.Size]] = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append((m, args[0].shape))) for m in modules]
    try:
        with torch.device("meta"):
            model(torch.empty(1, 3, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def own_input_size(why: str) -> Callable[[str], InputSizes]:
    """``Family.input_sizes`` of a family whose models run at their own input size alone (timm runs
    no other): ``why`` names what is made for it."""
    def sizes(name: str) -> InputSizes:
        size = timm.models.get_pretrained_cfg(name).input_size[-1]
        return InputSizes(size, why, largest=size)
    return sizes


@dataclass(frozen=True)
class Family:
    """A timm model family as the shared encoder sees it."""

    name: str
    timm_class: type[nn.Module]
    mirrors: dict[type, type]  # timm block/stage class -> mirror class
    layout: Callable[[nn.Module], Layout]  # stem and stages of one model of the family
    kept: tuple[str, ...] = ()  # modules or tensors that never run (frozen copies), if present
    check: Callable[[nn.Module], None] = no_check  # refusals before any conversion
    # timm modules no engine mirrors (their subclasses too), each with the reason its refusal gives
    refused: Mapping[type, str] = field(default_factory=dict)
    stem_pool: StemPool | None = None
    # mirror class -> its (norm, activation) leaves that run back to back: an engine may run each
    # pair as one operator (the sparse engine's batch norm + activation keeps fewer rows)
    norm_acts: Mapping[type, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    # mirror class -> its 1x1 conv-norm sub-modules without an activation (timm's ConvNormAct) whose
    # product an engine may make again in backward rather than keep (RepVGG's 1x1 branch, beside a
    # 3x3 that keeps the same input)
    pointwise_norms: Mapping[type, tuple[str, ...]] = field(default_factory=dict)
    # timm's maps are channels last between its modules (MambaOut); the engines' never are
    channels_last: bool = False
    # timm modules besides ``name`` whose models are this family's class (hardcorenas: MobileNetV3)
    other_modules: tuple[str, ...] = ()
    # timm classes besides ``timm_class`` of the same shape in the same module (EfficientVitLarge)
    other_classes: tuple[type[nn.Module], ...] = ()
    # where the stages are no chain of modules (HRNet's parallel branches): the family's own forward
    # from the input to the features, run on the converted body and the timm model alike (the
    # body keeps timm's names); the layout then only names the modules to convert
    features: Callable[[nn.Module, Any], list] | None = None
    # the input sizes the timm model of a name runs at, where some sizes are off limits (MaxViT's whole grids)
    input_sizes: Callable[[str], InputSizes] = any_input_size
    # the model's own parameters the family's ``features`` reads (Hiera's position embeddings), trainable
    # copies on the converted body under timm's names, if the model has them
    parameters: tuple[str, ...] = ()
    # the strides of the encoder's outputs, fine to coarse (the scales SparK's decoder can take)
    strides: tuple[int, ...] = STRIDES

    def __post_init__(self) -> None:
        check_scales(self.strides)

    @property
    def timm_classes(self) -> tuple[type[nn.Module], ...]:
        """The timm model classes of the family."""
        return (self.timm_class, *self.other_classes)

    @property
    def timm_modules(self) -> tuple[str, ...]:
        """The timm modules whose models are this family's class (its refusals still apply)."""
        return (self.name, *self.other_modules)

    def convert(self, model: nn.Module, leaf: LeafConverter, layout: Layout) -> nn.ModuleDict:
        """Stem and stages with leaves converted (plus the kept modules); names match timm's."""
        self.check(model)
        for path, module in model.named_modules():
            why = next((why for cls, why in self.refused.items() if isinstance(module, cls)), None)
            if why is not None:
                raise unsupported(module, path, why)
        convert = Converter(leaf, self.mirrors)
        body = nn.ModuleDict({name: convert(getattr(model, name), name) for name in layout.top_level()})
        for name in self.parameters:
            if getattr(model, name, None) is not None:
                body.register_parameter(name, nn.Parameter(getattr(model, name).detach().clone()))
        for path in self.kept:
            *parents, name = path.split(".")
            try:
                parent = model.get_submodule(".".join(parents))
            except AttributeError:
                continue
            item = getattr(parent, name, None)
            if not isinstance(item, (nn.Module, torch.Tensor)):  # e.g. a head without a norm
                continue
            holder = body
            for parent_name in parents:
                if parent_name not in holder._modules:
                    holder.add_module(parent_name, nn.Module())
                holder = holder._modules[parent_name]
            if isinstance(item, nn.Module):
                holder.add_module(name, frozen_copy(item))
            else:  # a tensor a module holds itself (an attention pool's position embedding)
                holder.register_buffer(name, item.detach().clone())
        return body

    @torch.no_grad()
    def plain_features(self, model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
        """The stage outputs of the ordinary (unmasked) timm model, for comparison."""
        if self.features is not None:
            return self.features(model, images)
        layout = self.layout(model)
        x = images
        for path in layout.stem:
            x = model.get_submodule(path)(x)
        feats = []
        for stage in layout.stages:
            for path in stage:
                x = model.get_submodule(path)(x)
            feats.append(x.permute(0, 3, 1, 2) if self.channels_last else x)
        return feats
