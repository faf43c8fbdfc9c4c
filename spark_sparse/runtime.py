"""CPU run-time settings for training and benchmarks, applied by entry points (never on import).

glibc returns every large freed block to the kernel and page-faults it back in at the next
allocation. A training step allocates and frees hundreds of megabytes of activations layer by
layer, and on CPU those page faults cost as much as the arithmetic; keeping freed memory in the
heap removes them (for dense and sparse alike), at the price of a process that keeps its peak
memory mapped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed memory instead of unmapping it; False where that is not glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        return bool(ok and libc.mallopt(_M_TOP_PAD, 256 << 20))
    except (OSError, AttributeError):
        return False


def configure_cpu(threads: int | None = None, keep_memory: bool = True) -> dict:
    """Set torch's intra-op threads (None: PyTorch's default, one per core) and the allocator;
    returns the settings, for the record."""
    if threads:
        torch.set_num_threads(threads)
    kept = keep_freed_memory() if keep_memory else False
    return {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "keep_freed_memory": kept}
