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
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten
COPIES = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default, aten.to.dtype_layout,
          aten.to.device, aten.to.dtype, aten.to.other}
HOST_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.equal.default,
              aten.is_nonzero.default, aten.unique_consecutive.default, aten._unique2.default,
              aten.masked_select.default, aten.repeat_interleave.Tensor}


class DeviceAudit(TorchDispatchMode):
    """Record, while active, the operations that mix devices or read a non-CPU tensor on the host."""

    def __init__(self):
        super().__init__()
        self.mixed: Counter[str] = Counter()
        self.host_reads: Counter[str] = Counter()
        self.copies: Counter[str] = Counter()
        self.queued: Counter[str] = Counter()  # operations with a result on a device other than the CPU

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
        if func in HOST_READS and any(t.device.type != "cpu" for t in tensors):
            self.host_reads[name] += 1
        out = func(*args, **kwargs)
        if any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in tree_leaves(out)):
            self.queued[name] += 1
        return out
