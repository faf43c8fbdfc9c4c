"""spark-sparse: SparK masked image pretraining for convnets with genuine sparse convolution.

The names below are imported on first use (PEP 562): ``import spark_sparse`` itself loads nothing
heavy (so an app's command line can answer a Ctrl-C while torch loads), ``SparseEncoder`` imports
MinkowskiEngine only when asked for, and everything else, fine-tuning and the dense-masked engine
included, works without it.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> (module, attribute); SparseEncoder comes from the engine registry
_EXPORTS = {
    "random_active": (".mask", "random_active"),
    "upsample_active": (".mask", "upsample_active"),
    "MaskedDenseEncoder": (".encoders.masked_engine", "MaskedDenseEncoder"),
    "MaskedTensor": (".encoders.masked_engine", "MaskedTensor"),
    "ENGINES": (".encoders.registry", "ENGINES"),
    "create_encoder": (".encoders.registry", "create_encoder"),
    "engine_class": (".encoders.registry", "engine_class"),
}

__all__ = sorted([*_EXPORTS, "SparseEncoder"])


def __getattr__(name: str) -> Any:
    if name == "SparseEncoder":  # a one-line ImportError with the fix when MinkowskiEngine is missing
        return importlib.import_module(".encoders.registry", __name__).engine_class("sparse")
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        return getattr(importlib.import_module(module, __name__), attribute)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
