"""Which device every operation of a pass touches: a torch dispatch mode that sees each aten
operation with its tensor arguments and outputs.

Two kinds of finding:
* mixed: an operation given tensors on two devices (a 0-dimensional CPU tensor is a scalar,
  which every device accepts). CUDA refuses most of these, and the ones it accepts (indexing
  with CPU indices) copy, and wait, behind the caller's back.
* host reads: an operation whose result the CPU must read from a device tensor (``.item()``,
  ``nonzero``, ``torch.equal``...): on a GPU the CPU stops until every queued kernel has run.
Copies between devices (``.to``) are legitimate and counted apart, and so is every operation
whose result lives on the device (on a GPU each is a kernel the CPU queues).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._pytree import tree_leaves

from benchmarks.queued_ops import QueuedOps

aten = torch.ops.aten
COPIES = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default, aten.to.dtype_layout,
          aten.to.device, aten.to.dtype, aten.to.other}


class DeviceAudit(QueuedOps):
    """Record, while active, the operations that mix devices or read a non-CPU tensor on the host
    (``host_reads``), the copies between devices, and what is queued on a device (``queued``)."""

    def __init__(self):
        super().__init__()
        self.mixed: Counter[str] = Counter()
        self.copies: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        devices = {t.device.type for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
        name = str(func.overloadpacket.__name__)
        if func in COPIES:
            target = kwargs.get("device")
            if len(devices | ({torch.device(target).type} if target is not None else set())) > 1:
                self.copies[name] += 1
        elif len(devices) > 1:
            self.mixed[f"{name} {sorted(devices)}"] += 1
        return super().__torch_dispatch__(func, types, args, kwargs)


def _fixed_at_capture(arg):
    """What a CUDA graph keeps of an argument: a tensor's shape, dtype and device (its values
    are read at replay), a 0-dimensional CPU tensor's value (a scalar, read into the kernel's
    arguments at capture) and any other argument itself."""
    if not isinstance(arg, torch.Tensor):
        return arg
    if arg.device.type == "cpu" and arg.dim() == 0:
        return ("scalar", arg.item())
    return (tuple(arg.shape), arg.dtype, arg.device.type)


class OperationTrace(DeviceAudit):
    """``DeviceAudit`` that also lists, in order, every operation with what a CUDA graph captured
    on it would fix (``operations``): a replay queues exactly that list again."""

    def __init__(self):
        super().__init__()
        self.operations: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fixed = tuple(_fixed_at_capture(a) for a in tree_leaves((args, kwargs)))
        self.operations.append((str(func), tuple(kwargs), fixed))
        return super().__torch_dispatch__(func, types, args, kwargs)

    def first_difference(self, other: "OperationTrace") -> str | None:
        """None where both queued the same operations, else the first that differs."""
        for i, (mine, theirs) in enumerate(zip(self.operations, other.operations)):
            if mine != theirs:
                return f"operation {i}: {mine} against {theirs}"
        if len(self.operations) != len(other.operations):
            return f"{len(self.operations)} operations against {len(other.operations)}"
        return None
