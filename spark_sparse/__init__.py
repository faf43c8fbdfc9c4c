"""spark-sparse: SparK masked image pretraining for convnets with genuine sparse convolution."""

import warnings

with warnings.catch_warnings():
    # a CPU-only MinkowskiEngine build is what we build on machines without a GPU: not news
    warnings.filterwarnings("ignore", message=".*compiled with CPU_ONLY.*")
    import MinkowskiEngine  # noqa: F401

from .mask import random_active, upsample_active
from .encoders.masked import MaskedDenseEncoder, MaskedTensor
from .encoders.registry import ENCODERS, create_encoder
from .encoders.sparse import SparseEncoder

__all__ = [
    "ENCODERS",
    "MaskedDenseEncoder",
    "MaskedTensor",
    "SparseEncoder",
    "create_encoder",
    "random_active",
    "upsample_active",
]
