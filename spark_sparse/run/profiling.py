"""How much of a training step the GPU spends idle, waiting for the CPU.

Steps run back to back as pretraining runs them, the CPU waiting for the GPU once a step (the
loss is read), under torch.profiler. The GPU is busy while a kernel, copy or memset runs; the
idle share is the part of the steps' wall time (the profiled window, from the first step's
start to the last one's end) covered by none. The profiler adds a little CPU time per queued
operation, so this share is an upper bound; ``busy_s`` (GPU time a step) against the step's
unprofiled median gives the other estimate.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

WINDOW = "spark_sparse.steps"
GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")  # trace categories of work on the GPU


def covered(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Length of the union of ``intervals`` within [start, end)."""
    total, reach = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, reach), min(b, end)
        if b > a:
            total += b - a
            reach = b
    return total


def idle_from_trace(events: list[dict], window: str = WINDOW) -> tuple[float, float]:
    """(idle share of the window, GPU-busy microseconds in it) from a Chrome trace's events."""
    marks = [e for e in events if e.get("name") == window and e.get("ph") == "X"
             and e.get("cat", "").lower() == "user_annotation"]
    if not marks:
        raise ValueError(f"the trace has no '{window}' annotation")
    start = float(marks[0]["ts"])
    end = start + float(marks[0]["dur"])
    work = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in events
            if e.get("ph") == "X" and e.get("cat", "").lower() in GPU_WORK]
    busy = covered(work, start, end)
    if busy == 0:  # steps that ran on a GPU: the profiler saw none of it
        raise ValueError(f"the trace has no GPU work in its '{window}' window (CUPTI unavailable?)")
    return 1.0 - busy / (end - start), busy


def profile_steps(step: Callable[[], None], steps: int, device: torch.device) -> list[dict]:
    """The trace events of ``steps`` calls of ``step``, each followed by a wait for ``device``."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        with record_function(WINDOW):
            for _ in range(steps):
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        return json.loads(path.read_text())["traceEvents"]


def gpu_idle(step: Callable[[], None], steps: int, device: torch.device) -> tuple[float, float] | None:
    """(idle share, GPU-busy seconds a step) over ``steps`` back-to-back steps; None off CUDA, and
    None with a warning where the trace cannot tell (a share of 1 would be a figure nobody measured)."""
    if device.type != "cuda":
        return None
    try:
        share, busy_us = idle_from_trace(profile_steps(step, steps, device))
    except ValueError as err:
        warnings.warn(f"GPU idle share not measured: {err}", stacklevel=2)
        return None
    return share, busy_us / 1e6 / steps
