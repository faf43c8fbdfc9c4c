"""spark-sparse: SparK masked image pretraining for convnets with genuine sparse convolution."""

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
