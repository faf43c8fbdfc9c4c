"""Peak memory of one pass: what it adds on top of what was already resident.

* CUDA: ``torch.cuda.max_memory_allocated`` over the pass, minus the allocation before it
  (MinkowskiEngine allocates through PyTorch's caching allocator, so its buffers count too).
* CPU (Linux): the growth of the process's resident set. Free heap pages are first handed back
  to the OS (``malloc_trim``), the kernel's high-water mark is reset (``/proc/self/clear_refs``),
  and after the pass ``VmHWM - VmRSS(before)`` is read. Unlike PyTorch's allocator statistics
  this also sees MinkowskiEngine's own C++ allocations (coordinate hash maps, kernel maps).
  Where the high-water mark cannot be reset, a thread samples ``/proc/self/statm`` every
  millisecond instead (peaks shorter than that can be missed).

Measure in a run of its own, not in a timed one: the trim and the sampling cost time.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from typing import Callable

import torch

from spark_sparse.run.runtime import returning_freed_memory

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MB = 2**20


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _reset_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5": reset the peak RSS to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def cpu_method() -> str:
    """Which CPU method ``peak_memory_mb`` will use here."""
    if _status_kb("VmHWM") is None:
        return "unavailable"
    return "rss_high_water" if _reset_high_water() else "rss_sampled_1ms"


def _settle() -> None:
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class _Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = _rss_bytes()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)


def peak_memory_mb(fn: Callable[[], None], device: torch.device) -> tuple[float | None, str]:
    """Run ``fn`` once; (peak memory it added in MiB, method name)."""
    # with glibc keeping freed memory (runtime.configure_cpu) the resident set would also count
    # heap fragmentation; the default policy maps large blocks, so RSS follows live memory
    with returning_freed_memory():
        return _peak_memory_mb(fn, device)


def _peak_memory_mb(fn: Callable[[], None], device: torch.device) -> tuple[float | None, str]:
    _settle()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MB, "cuda_max_allocated"
    method = cpu_method()
    if method == "unavailable":
        fn()
        return None, method
    if method == "rss_high_water":
        before = _rss_bytes()
        _reset_high_water()
        fn()
        return max(0, _status_kb("VmHWM") * 1024 - before) / MB, method
    before = _rss_bytes()
    sampler = _Sampler()
    sampler.start()
    fn()
    sampler.done.set()
    sampler.join()
    return max(0, max(sampler.peak, _rss_bytes()) - before) / MB, method
