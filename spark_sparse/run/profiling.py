"""How much of a training step the GPU spends idle, waiting for the CPU.

``StepProfiler``: a training run's own steps (``profile.start``, ``profile.steps``), all they do
included (data, optimizer, logging). ``gpu_idle``: steps a benchmark hands it, run back to back
as pretraining runs them, the CPU waiting for the GPU once a step (the loss is read). Both under
torch.profiler. The GPU is busy while a kernel, copy or memset runs; the
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


def _activities(device: torch.device) -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def profile_steps(step: Callable[[], None], steps: int, device: torch.device) -> list[dict]:
    """The trace events of ``steps`` calls of ``step``, each followed by a wait for ``device``."""
    with profile(activities=_activities(device)) as prof:
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


class StepProfiler:
    """torch.profiler over the ``steps`` steps after the first ``start`` that this process takes
    (a run resumed at step ``first``: steps ``first + start + 1`` ..), as the run takes them
    (nothing waits for the GPU but at the window's end): their trace in Chrome's format (Perfetto,
    chrome://tracing) and ``summary.json``, with on CUDA the share of the window the GPU idled,
    written to ``folder``. ``steps`` 0: off. The first steps are best left out (cuDNN's autotuning,
    a CUDA graph's capture, the data loader's start: each process's, a resumed one's too)."""

    def __init__(self, start: int, steps: int, device: torch.device, folder: Path, first: int = 0):
        self.start, self.steps, self.device, self.folder = first + start, steps, device, folder
        self._profile: profile | None = None
        self._window: record_function | None = None
        self._first = 0

    def after_step(self, step: int) -> dict | None:
        """Call once a step is taken (``step``: the steps taken so far); returns the summary when
        the window closes."""
        if self.steps > 0 and self._profile is None and step == self.start:
            self._profile = profile(activities=_activities(self.device))
            self._profile.start()
            self._window = record_function(WINDOW)
            self._window.__enter__()
            self._first = step + 1
        elif self._profile is not None and step >= self.start + self.steps:
            return self.finish(step)
        return None

    def finish(self, step: int) -> dict | None:
        """Close the window after step ``step`` (a run that ends inside it keeps what it profiled);
        None when no window is open."""
        if self._profile is None:
            return None
        # closed once, whatever fails below
        prof, window, self._profile, self._window = self._profile, self._window, None, None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the window ends with the GPU's work of its steps
        window.__exit__(None, None, None)
        prof.stop()
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = self.folder / f"trace_steps{self._first}-{step}.json"
        prof.export_chrome_trace(str(trace))
        summary = {"steps": [self._first, step], "device": self.device.type, "trace": trace.name,
                   "gpu_idle_share": None, "gpu_busy_s_per_step": None}
        if self.device.type == "cuda":
            try:
                share, busy_us = idle_from_trace(json.loads(trace.read_text())["traceEvents"])
                summary.update(gpu_idle_share=share, gpu_busy_s_per_step=busy_us / 1e6 / (step - self._first + 1))
            except ValueError as err:  # no GPU work seen (CUPTI unavailable): no share rather than a wrong one
                summary["note"] = f"GPU idle share not measured: {err}"
        (self.folder / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    @staticmethod
    def line(summary: dict, folder: Path) -> str:
        """The summary in one line, for the console."""
        share = summary["gpu_idle_share"]
        idle = f"the GPU idled {share:.1%} of them; " if share is not None else ""
        return f"profiled steps {summary['steps'][0]}-{summary['steps'][1]}: {idle}trace {folder / summary['trace']}"
