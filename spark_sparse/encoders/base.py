"""What every engine's encoder shares: conversion from timm, the stage loop, timm-style weights.

An engine (sparse_engine.py, masked_engine.py) subclasses ``Encoder`` with its leaf conversion,
how images and mask enter the engine, how a stage output becomes a dense map, and how its
parameter names and layouts map to timm's. The families it can convert are listed in families/__init__.py.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable
from fnmatch import fnmatch
from typing import Any

import torch
from torch import nn

from ..mask import check_inputs
from ..timm_models import create_timm_model
from .families import family_of
from .family import Family
from .layouts import Layout
from .refusals import ConversionError, unsupported

__all__ = ["ConversionError", "Encoder", "resolve_model", "unsupported"]


def resolve_model(model: nn.Module | str, **timm_kwargs) -> nn.Module:
    """Accept a timm model instance, or a timm model name (built with ``timm_kwargs``)."""
    if isinstance(model, str):
        model = create_timm_model(model, num_classes=0, **timm_kwargs)
    family_of(model)
    return model


def model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture", type(model).__name__.lower())


class Encoder(nn.Module):
    """A timm convnet mirrored for one engine; outputs its stages at the family's ``strides`` (4, 8,
    16, 32 for most; Visformer's 8, 16, 32; NesT's 4, 8, 16), the last the mask's patch (``stride``)."""

    def __init__(self, body: nn.ModuleDict, family: Family, layout: Layout, name: str,
                 timm_no_weight_decay: Iterable[str] = ()):
        super().__init__()
        self.body = body
        self.family = family
        self.layout = layout
        self.channels = list(layout.channels)
        self.strides = family.strides
        self.stride = family.strides[-1]
        self.model_name = name
        # the timm model's no_weight_decay(): names and fnmatch patterns, in timm's names
        self.timm_no_weight_decay = frozenset(timm_no_weight_decay)

    @staticmethod
    def convert_leaf(module: nn.Module, path: str) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def from_timm(cls, model: nn.Module | str, **options) -> "Encoder":
        """Convert a timm model (or a timm model name) with its current weights; ``options``
        go to the engine's leaf conversion."""
        accepted = list(inspect.signature(cls.convert_leaf).parameters)[2:]  # after (module, path)
        unknown = sorted(set(options) - set(accepted))
        if unknown:  # e.g. pretrained=True, which belongs to timm.create_model
            raise TypeError(f"{cls.__name__}.from_timm takes the engine's conversion options "
                            f"({', '.join(accepted) or 'none'}), not {', '.join(unknown)}; for timm's options "
                            "pass a model: from_timm(timm.create_model(name, ...))")
        model = resolve_model(model)
        family = family_of(model)
        leaf = functools.partial(cls.convert_leaf, **options) if options else cls.convert_leaf
        layout = family.layout(model)
        exempt = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
        return cls(family.convert(model, leaf, layout), family, layout, model_name(model), exempt)

    def plan(self, active: torch.Tensor, device: torch.device | str, like: Any = None) -> Any:
        """What the engine makes of a mask alone, before its images come (the sparse engine: the
        batch's coordinates and index tables; with ``like``, an earlier batch's plan, every table
        that batch's layers read): made while a GPU still runs the previous batch, it leaves the
        forward pass only the GPU's work. None where the engine has nothing to make ahead."""
        return None

    def copy_plan_(self, plan: Any, other: Any) -> None:
        """Overwrite ``plan`` (what ``plan()`` made) in place with ``other``, a later batch's planned
        ``like`` it: a step captured on ``plan``'s batch (a CUDA graph) then computes ``other``'s.
        Refused where the engine's step cannot be replayed."""
        raise ValueError(f"the {type(self).__name__}'s step cannot be captured and replayed (a CUDA graph): "
                         f"it reads the device back or makes its index tables during the step")

    def encode_input(self, images: torch.Tensor, active: torch.Tensor, layout: Any = None):
        raise NotImplementedError

    def to_dense(self, feature, batch: int, size: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, active: torch.Tensor, layout: Any = None) -> list:
        """The stage outputs (at ``strides``), fine to coarse, in the engine's type;
        ``layout``: ``plan(active, images.device)``'s, made ahead (by default made now)."""
        check_inputs(images, active, self.stride)
        if self.training and int(active.sum()) == 1:
            raise ValueError("batch-norm in train mode needs more than one visible site per scale, "
                             "but the whole batch has a single visible patch; use eval mode or "
                             "more visible patches")
        x = self.encode_input(images, active, layout)
        if self.family.features is not None:
            return self.family.features(self.body, x)
        for path in self.layout.stem:
            x = self.body.get_submodule(path)(x)
        feats = []
        for stage in self.layout.stages:
            for path in stage:
                x = self.body.get_submodule(path)(x)
            feats.append(x)
        return feats

    def dense_features(self, images: torch.Tensor, active: torch.Tensor, layout: Any = None) -> list[torch.Tensor]:
        """The same as ``forward`` as dense (B, C, h, w) tensors with zeros at hidden sites."""
        b, _, h, w = images.shape
        feats = self(images, active, layout)
        return [self.to_dense(f, b, (h // s, w // s)) for f, s in zip(feats, self.strides)]

    def no_weight_decay(self) -> set[str]:
        """Our names of the parameters timm's model exempts from weight decay by name (position
        tables, attention biases: its ``no_weight_decay()``), matched as timm's optimizers match."""
        return {k for k, _ in self.named_parameters()
                if any(fnmatch(self.timm_key(k), pattern) for pattern in self.timm_no_weight_decay)}

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
