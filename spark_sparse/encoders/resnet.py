"""The shape of a timm ResNet, mirrored for any engine (sparse or masked-dense).

Both encoders are built by walking a timm ResNet and swapping each leaf module (convolution,
batch-norm, activation, pooling, drop-path) for an engine-specific one; the blocks and the stage
layout below are shared and keep timm's module names, so weights map one-to-one.
"""

from __future__ import annotations

import functools
from typing import Callable

import timm
import torch
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from ..mask import check_inputs

LeafConverter = Callable[[nn.Module, str], nn.Module]
STAGES = ("layer1", "layer2", "layer3", "layer4")
STEM = ("conv1", "bn1", "act1", "maxpool")


class ConversionError(ValueError):
    """A module of the timm model has no equivalent in the target engine."""


def unsupported(module: nn.Module, path: str, why: str = "") -> ConversionError:
    detail = f": {why}" if why else ""
    return ConversionError(f"cannot convert {type(module).__name__} at '{path}'{detail}")


class _MirrorBlock(nn.Module):
    """A timm residual block with its leaves converted; subclasses name the leaves and the order."""

    leaves: tuple[str, ...] = ()

    def __init__(self, block: nn.Module, leaf: LeafConverter, path: str):
        super().__init__()
        _reject_extras(block, path, ("se", "drop_block", "aa"))
        for name in self.leaves:
            setattr(self, name, leaf(getattr(block, name), f"{path}.{name}"))
        self.downsample = convert_tree(block.downsample, leaf, f"{path}.downsample")
        self.drop_path = convert_tree(block.drop_path, leaf, f"{path}.drop_path")

    def residual(self, x, shortcut):
        if self.drop_path is not None:
            x = self.drop_path(x)
        return x + shortcut


class MirrorBasicBlock(_MirrorBlock):
    """timm's BasicBlock: conv-bn-act-conv-bn, + shortcut, act."""

    leaves = ("conv1", "bn1", "act1", "conv2", "bn2", "act2")

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(self.residual(x, shortcut))


class MirrorBottleneck(_MirrorBlock):
    """timm's Bottleneck: 1x1, 3x3 (strided), 1x1, + shortcut, act."""

    leaves = ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "conv3", "bn3", "act3")

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.act3(self.residual(x, shortcut))


def _reject_extras(block: nn.Module, path: str, names: tuple[str, ...]) -> None:
    """SE, DropBlock and anti-aliasing have no sparse version (yet): refuse them by name."""
    for name in names:
        sub = getattr(block, name, None)
        if sub is not None and not isinstance(sub, nn.Identity):
            raise unsupported(sub, f"{path}.{name}")


def convert_tree(module: nn.Module | None, leaf: LeafConverter, path: str) -> nn.Module | None:
    """Convert a subtree: blocks and Sequentials keep their structure, everything else is a leaf."""
    if module is None:
        return None
    if isinstance(module, Bottleneck):
        return MirrorBottleneck(module, leaf, path)
    if isinstance(module, BasicBlock):
        return MirrorBasicBlock(module, leaf, path)
    if isinstance(module, nn.Sequential):
        return nn.Sequential(*[convert_tree(m, leaf, f"{path}.{i}") for i, m in enumerate(module)])
    return leaf(module, path)


def resolve_model(model: nn.Module | str, **timm_kwargs) -> ResNet:
    """Accept a timm ResNet instance, or a timm model name (built with ``timm_kwargs``)."""
    if isinstance(model, str):
        try:
            model = timm.create_model(model, pretrained=False, num_classes=0, **timm_kwargs)
        except RuntimeError as err:  # timm's "Unknown model"
            raise ValueError(f"unknown timm model '{model}': {err}") from None
    if not isinstance(model, ResNet):
        raise ConversionError(f"expected a timm ResNet, got {type(model).__name__}; "
                              "only BasicBlock/Bottleneck ResNets can be converted")
    return model


def convert_resnet(model: ResNet, leaf: LeafConverter) -> nn.ModuleDict:
    """Stem and the four stages of ``model`` with leaves converted; names match timm's."""
    body = nn.ModuleDict()
    for name in STEM + STAGES:
        body[name] = convert_tree(getattr(model, name), leaf, name)
    return body


def stage_channels(model: ResNet) -> list[int]:
    return [info["num_chs"] for info in model.feature_info if info["module"] in STAGES]


def model_name(model: ResNet) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture", type(model).__name__.lower())


@torch.no_grad()
def plain_features(model: ResNet, images: torch.Tensor) -> list[torch.Tensor]:
    """The four stage outputs of an ordinary (unmasked) timm ResNet, for comparison."""
    x = model.maxpool(model.act1(model.bn1(model.conv1(images))))
    feats = []
    for name in STAGES:
        x = getattr(model, name)(x)
        feats.append(x)
    return feats


class ResNetEncoder(nn.Module):
    """What both engines share: conversion from timm, the stage loop, timm-style weights.

    Subclasses provide the leaf conversion, how images and mask enter the engine, how a stage
    output becomes a dense map, and how their parameter names/layouts map to timm's.
    """

    stride = 32
    strides = (4, 8, 16, 32)

    def __init__(self, body: nn.ModuleDict, channels: list[int], name: str):
        super().__init__()
        self.body = body
        self.channels = channels
        self.model_name = name

    @staticmethod
    def convert_leaf(module: nn.Module, path: str) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def from_timm(cls, model: nn.Module | str, **options) -> "ResNetEncoder":
        """Convert a timm ResNet (or a timm model name) with its current weights; ``options``
        go to the engine's leaf conversion."""
        model = resolve_model(model)
        leaf = functools.partial(cls.convert_leaf, **options) if options else cls.convert_leaf
        return cls(convert_resnet(model, leaf), stage_channels(model), model_name(model))

    def encode_input(self, images: torch.Tensor, active: torch.Tensor):
        raise NotImplementedError

    def to_dense(self, feature, batch: int, size: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, active: torch.Tensor) -> list:
        """The four stage outputs (strides 4, 8, 16, 32), fine to coarse, in the engine's type."""
        check_inputs(images, active, self.stride)
        if self.training and int(active.sum()) == 1:
            raise ValueError("batch-norm in train mode needs more than one visible site per scale, "
                             "but the whole batch has a single visible patch; use eval mode or "
                             "more visible patches")
        x = self.encode_input(images, active)
        for name in STEM:
            x = self.body[name](x)
        feats = []
        for name in STAGES:
            x = self.body[name](x)
            feats.append(x)
        return feats

    def dense_features(self, images: torch.Tensor, active: torch.Tensor) -> list[torch.Tensor]:
        """The same as ``forward`` as dense (B, C, h, w) tensors with zeros at hidden sites."""
        b, _, h, w = images.shape
        feats = self(images, active)
        return [self.to_dense(f, b, (h // s, w // s)) for f, s in zip(feats, self.strides)]

    # -- weights in timm's names and layouts ------------------------------------------------
    def timm_key(self, key: str) -> str:
        return key.removeprefix("body.")

    def tensor_to_timm(self, key: str, value: torch.Tensor) -> torch.Tensor:
        return value

    def tensor_from_timm(self, key: str, value: torch.Tensor) -> torch.Tensor:
        return value

    def to_timm(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename/re-layout any dict keyed like our state dict (weights, gradients) to timm's."""
        return {self.timm_key(k): self.tensor_to_timm(k, v) for k, v in tensors.items()}

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """Loads with strict=True into ``timm.create_model(name, num_classes=0)``."""
        return {k: v.detach().clone() for k, v in self.to_timm(self.state_dict()).items()}

    def load_timm_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load timm-style weights (e.g. a timm model's state_dict(), fc and all ignored)."""
        own = self.state_dict()
        missing = [self.timm_key(k) for k in own if self.timm_key(k) not in state_dict]
        if missing:
            raise KeyError(f"timm state dict lacks {len(missing)} encoder tensors, e.g. {missing[:3]}")
        new = {}
        for key, value in own.items():
            src = self.tensor_from_timm(key, state_dict[self.timm_key(key)])
            if src.shape != value.shape:
                raise ValueError(f"shape mismatch for '{self.timm_key(key)}': {tuple(src.shape)} "
                                 f"does not fit {tuple(value.shape)}")
            new[key] = src
        self.load_state_dict(new)
