"""Encoders by engine name, so configs and benchmarks can choose one by string."""

from __future__ import annotations

from torch import nn

from .base import Encoder, resolve_model
from .masked import MaskedDenseEncoder
from .sparse import SparseEncoder

ENCODERS: dict[str, type[Encoder]] = {
    "sparse": SparseEncoder,
    "dense_masked": MaskedDenseEncoder,
}


def create_encoder(model: str | nn.Module, engine: str = "sparse", **timm_kwargs) -> Encoder:
    """``create_encoder("resnet50", "sparse", drop_path_rate=0.05)``: a timm model, converted."""
    if engine not in ENCODERS:
        raise ValueError(f"unknown engine '{engine}'; choose one of {sorted(ENCODERS)}")
    return ENCODERS[engine].from_timm(resolve_model(model, **timm_kwargs))
