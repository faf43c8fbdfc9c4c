"""Host-to-GPU copies that never make the CPU wait for the GPU.

The sparse engine builds a batch's index tables on the CPU (from the mask, which lives there)
and the features live on the GPU. A copy from pageable host memory may first wait for the
stream to drain (CUDA's rule for staging pageable memory): the CPU would stop queueing work and
the GPU would idle. Pinned memory and ``non_blocking`` make the copy one more queued operation;
PyTorch's pinned-memory cache keeps the host buffer until the copy has run. Several tensors (a
batch's tables) travel in one copy: on a GPU every copy is a launch the CPU pays for.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

T = TypeVar("T")

ALIGNMENT = 16  # bytes: each packed tensor starts where a view of any dtype may start
Layout = list[tuple[int, torch.dtype, torch.Size]]  # each packed tensor's byte offset, dtype and shape


def is_on(actual: torch.device, wanted: torch.device) -> bool:
    """Whether a tensor on ``actual`` is already on ``wanted`` (a device without an index: any of its kind)."""
    return actual.type == wanted.type and wanted.index in (None, actual.index)


def pack(tensors: list[Tensor], pin: bool = False) -> tuple[Tensor, Layout]:
    """One uint8 buffer on the CPU (pinned with ``pin``) holding the values of ``tensors`` (on the
    CPU), and where each lies in it (``unpack`` hands them out again)."""
    layout: Layout = []
    size = 0
    for t in tensors:
        layout.append((size, t.dtype, t.shape))
        size += -(-t.numel() * t.element_size() // ALIGNMENT) * ALIGNMENT
    buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
    for t, view in zip(tensors, unpack(buffer, layout)):
        view.copy_(t)
    return buffer, layout


def unpack(buffer: Tensor, layout: Layout) -> list[Tensor]:
    """The tensors ``pack`` put in ``buffer`` (or in a copy of it), as views of it."""
    return [buffer[start:start + shape.numel() * dtype.itemsize].view(dtype).view(shape)
            for start, dtype, shape in layout]


def to_device(value: T, device: torch.device) -> T:
    """``value`` (a tensor, or a tuple, NamedTuple, list or dict holding tensors and other values)
    with its tensors on ``device``; CPU tensors bound for a GPU go through pinned memory without
    blocking, two or more of them (that need no gradient) in one copy, as views of one buffer
    there. On the CPU, or already there, a tensor is returned as it is."""
    leaves, spec = tree_flatten(value)
    moving = [i for i, t in enumerate(leaves) if isinstance(t, Tensor) and not is_on(t.device, device)]
    packed = [i for i in moving if leaves[i].device.type == "cpu" and not leaves[i].requires_grad]
    if len(packed) > 1 and device.type != "cpu":
        buffer, layout = pack([leaves[i] for i in packed], pin=device.type == "cuda")
        for i, t in zip(packed, unpack(buffer.to(device, non_blocking=True), layout)):
            leaves[i] = t
        moving = [i for i in moving if i not in packed]
    for i in moving:
        t = leaves[i]
        leaves[i] = (t.pin_memory().to(device, non_blocking=True) if t.device.type == "cpu" and device.type == "cuda"
                     else t.to(device))
    return tree_unflatten(leaves, spec)
