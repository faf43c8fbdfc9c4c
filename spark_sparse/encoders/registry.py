"""Encoders by engine name, so configs and benchmarks can choose one by string.

Each engine's module is imported when the engine is first asked for: the sparse engine needs
MinkowskiEngine, which fine-tuning and the dense-masked engine do without.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from torch import nn

from .base import Encoder, resolve_model


class _Engines(Mapping[str, type[Encoder]]):
    """Engine name -> encoder class; looking a name up imports its module."""

    def __init__(self, **paths: str) -> None:
        self._paths = paths  # name -> "module:Class", the module relative to this package

    def __getitem__(self, engine: str) -> type[Encoder]:
        module, cls = self._paths[engine].split(":")
        return getattr(importlib.import_module(module, __package__), cls)

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


ENCODERS: Mapping[str, type[Encoder]] = _Engines(sparse=".sparse:SparseEncoder",
                                                 dense_masked=".masked:MaskedDenseEncoder")


def engine_class(engine: str) -> type[Encoder]:
    """The encoder class of ``engine``; ImportError (one line, with the fix) if the sparse
    engine is asked for without MinkowskiEngine."""
    if engine not in ENCODERS:
        raise ValueError(f"unknown engine '{engine}'; choose one of {sorted(ENCODERS)}")
    return ENCODERS[engine]


def create_encoder(model: str | nn.Module, engine: str = "sparse", **timm_kwargs) -> Encoder:
    """``create_encoder("resnet50", "sparse", drop_path_rate=0.05)``: a timm model, converted."""
    return engine_class(engine).from_timm(resolve_model(model, **timm_kwargs))
