"""Mixed precision: which arithmetic a run's forward pass uses.

``fp32`` runs everything in float32 (on CUDA, convolutions and matrix products alike either in
TF32, the apps' default, or in IEEE float32: ``set_tf32``). ``bf16`` and ``fp16`` run the
forward pass under ``torch.autocast``: matrix products and convolutions (timm's and the sparse
engine's own) in the 16-bit type, norm statistics and the loss in float32, parameters kept in
float32 (master weights, float32 gradients). fp16's narrow range needs loss scaling
(``torch.amp.GradScaler``), and autocast offers it on CUDA only; bf16 has float32's range and
needs none.

>>> with autocast("bf16", images.device.type):
...     loss = model(images)["loss"]
>>> loss.backward()  # outside autocast, as PyTorch recommends
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "fp16")

_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device_type: str) -> None:
    """Refuse, in one line, a precision that is unknown or that the device cannot autocast to."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got '{precision}'")
    if precision == "fp16" and device_type != "cuda":
        raise ValueError(f"precision=fp16 needs a CUDA device (got '{device_type}'); use bf16 on {device_type}")


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype of matrix products and convolutions under ``precision``."""
    check_precision(precision, "cuda")
    return _DTYPES[precision]


def needs_grad_scaler(precision: str) -> bool:
    """Whether the loss must be scaled (fp16's gradients underflow without it)."""
    check_precision(precision, "cuda")
    return precision == "fp16"


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype that sums over many rows and norm statistics of ``dtype`` values are taken in:
    float32 for 16-bit values (whose 8 or 11 bits would swallow the small terms of a long sum)."""
    return torch.promote_types(dtype, torch.float32)


def autocast(precision: str, device_type: str, cache: bool = True) -> contextlib.AbstractContextManager:
    """The context a forward pass runs in: nothing for fp32, ``torch.autocast`` otherwise
    (``cache=False`` for a pass captured in a CUDA graph, as torch asks: no weight casts kept)."""
    check_precision(precision, device_type)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=_DTYPES[precision], cache_enabled=cache)


def set_tf32(enabled: bool) -> None:
    """CUDA float32 convolutions and matrix products both in TF32 (tensor cores, a 10-bit mantissa)
    or both in IEEE float32. PyTorch's default mixes them (convolutions TF32, matrix products
    not): a layer run as a convolution in one engine and as GEMMs in the other would round
    differently and run at different speeds. Process-wide, as PyTorch's flags are: for entry points.

    Through the ``allow_tf32`` flags: in torch 2.11 and 2.14 they set the newer ``fp32_precision``
    settings as well, while setting those alone leaves the two out of step, and then reading a
    flag raises "mix of the legacy and new APIs" (libtorch_cuda reads the cuBLAS one)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def tf32_enabled() -> bool:
    """Whether CUDA float32 convolutions and matrix products run in TF32 (both, by ``set_tf32``)."""
    return torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
