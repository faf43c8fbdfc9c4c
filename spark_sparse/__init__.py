"""spark-sparse: SparK masked image pretraining for convnets with genuine sparse convolution.

``SparseEncoder`` (the sparse engine) imports MinkowskiEngine on first use; everything else,
fine-tuning and the dense-masked engine included, works without it.
"""

from typing import Any

from .mask import random_active, upsample_active
from .encoders.masked_engine import MaskedDenseEncoder, MaskedTensor
from .encoders.registry import ENGINES, create_encoder, engine_class

__all__ = [
    "ENGINES",
    "MaskedDenseEncoder",
    "MaskedTensor",
    "SparseEncoder",
    "create_encoder",
    "engine_class",
    "random_active",
    "upsample_active",
]


def __getattr__(name: str) -> Any:
    # PEP 562: `spark_sparse.SparseEncoder` imports the sparse engine, and MinkowskiEngine, only
    # when asked for (a one-line ImportError with the fix when MinkowskiEngine is missing)
    if name == "SparseEncoder":
        return engine_class("sparse")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
