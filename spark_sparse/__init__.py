"""spark-sparse: SparK masked image pretraining for convnets with genuine sparse convolution."""

import warnings

with warnings.catch_warnings():
    # a CPU-only MinkowskiEngine build is what we build on machines without a GPU: not news
    warnings.filterwarnings("ignore", message=".*compiled with CPU_ONLY.*")
    import MinkowskiEngine  # noqa: F401

from .mask import random_active, upsample_active
from .masked_encoder import MaskedDenseEncoder, MaskedTensor
from .registry import ENCODERS, create_encoder
from .sparse_encoder import SparseEncoder

__all__ = [
    "ENCODERS",
    "MaskedDenseEncoder",
    "MaskedTensor",
    "SparseEncoder",
    "create_encoder",
    "random_active",
    "upsample_active",
]
