"""Host-to-GPU copies that never make the CPU wait for the GPU.

The sparse engine builds a batch's index tables on the CPU (from the mask, which lives there)
and the features live on the GPU. A copy from pageable host memory may first wait for the
stream to drain (CUDA's rule for staging pageable memory): the CPU would stop queueing work and
the GPU would idle. Pinned memory and ``non_blocking`` make the copy one more queued operation;
PyTorch's pinned-memory cache keeps the host buffer until the copy has run.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


def is_on(actual: torch.device, wanted: torch.device) -> bool:
    """Whether a tensor on ``actual`` is already on ``wanted`` (a device without an index: any of its kind)."""
    return actual.type == wanted.type and wanted.index in (None, actual.index)


def to_device(value: T, device: torch.device) -> T:
    """``value`` (a tensor, or a tuple, NamedTuple or list holding tensors and other values) with
    its tensors on ``device``; a CPU tensor bound for a GPU goes through pinned memory without
    blocking. On the CPU, or already there, a tensor is returned as it is."""
    if isinstance(value, Tensor):
        if is_on(value.device, device):
            return value
        if value.device.type == "cpu" and device.type == "cuda":
            return value.pin_memory().to(device, non_blocking=True)
        return value.to(device)
    if isinstance(value, tuple):
        items = [to_device(v, device) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    return value
