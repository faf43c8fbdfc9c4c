"""Run-time settings for training and benchmarks, applied by entry points (never on import): the
CPU's allocator and threads, CUDA's float32 arithmetic and convolution algorithms.

glibc returns every large freed block to the kernel and page-faults it back in at the next
allocation. A training step allocates and frees hundreds of megabytes of activations layer by
layer, and on CPU those page faults cost as much as the arithmetic; keeping freed memory in the
heap removes them (for dense and sparse alike), at the price of a process that keeps its peak
memory mapped.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os

import torch

from ..precision import set_tf32, tf32_enabled

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
# glibc's defaults, restored while memory is being measured
_DEFAULTS = {_M_MMAP_MAX: 65536, _M_MMAP_THRESHOLD: 128 << 10, _M_TRIM_THRESHOLD: 128 << 10, _M_TOP_PAD: 0}
_KEEP = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1, _M_TOP_PAD: 256 << 20}
_kept = False  # whether configure_cpu switched the policy on (returning_freed_memory restores it)


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def _mallopt(settings: dict[int, int]) -> bool:
    libc = _libc()
    try:
        return libc is not None and all(libc.mallopt(k, v) for k, v in settings.items())
    except AttributeError:
        return False


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed memory instead of unmapping it; False where that is not glibc."""
    return _mallopt(_KEEP)


def trim_freed_memory() -> bool:
    """Hand the heap's free pages back to the kernel now (glibc's ``malloc_trim``), whatever the
    policy: between the phases of a process that keeps freed memory, so that its resident set
    drops to live memory without page faults inside a phase. False where that is not glibc."""
    libc = _libc()
    try:
        return libc is not None and libc.malloc_trim(0) in (0, 1)
    except AttributeError:
        return False


@contextlib.contextmanager
def returning_freed_memory():
    """glibc's default policy for the duration: large blocks are mapped and unmapped, so the
    resident set follows live memory (for measuring peaks), whatever configure_cpu chose."""
    _mallopt(_DEFAULTS)
    try:
        yield
    finally:
        if _kept:
            _mallopt(_KEEP)


def configure_cpu(threads: int | None = None, keep_memory: bool = True) -> dict:
    """Set torch's intra-op threads (None: PyTorch's default, one per core) and the allocator;
    returns the settings, for the record."""
    if threads:
        torch.set_num_threads(threads)
    global _kept
    kept = _kept = keep_freed_memory() if keep_memory else False
    return {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "keep_freed_memory": kept}


def configure_cuda(tf32: bool) -> dict:
    """CUDA's float32 arithmetic (``precision.set_tf32``) and cuDNN's autotuning of convolution
    algorithms, which pays off because a run's convolution shapes repeat (every SparK mask keeps
    the same number of patches per image; timm's training script turns it on too); returns the
    settings, for the record."""
    set_tf32(tf32)
    torch.backends.cudnn.benchmark = True
    return {"tf32": tf32_enabled(), "cudnn_benchmark": torch.backends.cudnn.benchmark}
