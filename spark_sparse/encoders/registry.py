"""Encoders by engine name, so configs and benchmarks can choose one by string.

Each engine's module is imported when the engine is first asked for: the sparse engine needs
MinkowskiEngine, which fine-tuning and the dense-masked engine do without.
"""

from __future__ import annotations

import importlib

from torch import nn

from .base import Encoder, resolve_model

# engine name -> (module, relative to this package; its encoder class)
ENGINES: dict[str, tuple[str, str]] = {
    "sparse": (".sparse_engine", "SparseEncoder"),
    "dense_masked": (".masked_engine", "MaskedDenseEncoder"),
}


def engine_class(engine: str) -> type[Encoder]:
    """The encoder class of ``engine``, its module imported now; ImportError (one line, with the
    fix) if the sparse engine is asked for without MinkowskiEngine."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine '{engine}'; choose one of {sorted(ENGINES)}")
    module, name = ENGINES[engine]
    return getattr(importlib.import_module(module, __package__), name)


def create_encoder(model: str | nn.Module, engine: str = "sparse", **timm_kwargs) -> Encoder:
    """``create_encoder("resnet50", "sparse", drop_path_rate=0.05)``: a timm model, converted."""
    return engine_class(engine).from_timm(resolve_model(model, **timm_kwargs))
