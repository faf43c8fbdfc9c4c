"""A SparK step captured once in a CUDA graph and replayed for every later batch.

On a GPU a step of the sparse engine is bound by the CPU launching its kernels (about a thousand
a ResNet-50 step; on an H200 the GPU idled half of each step, 2026-11-29), not by the GPU. A
CUDA graph launches the whole step at once. It replays the kernels it captured on the tensors
they read then, so each batch's images and index tables are copied into those of the batch it
was captured on (``SparK.copy_plan_``): the mask ratio fixes every table's shape, since every
image keeps as many patches. What the CPU decided during capture (shapes, paths, Python
numbers) stays as it was; nothing of the sparse engine's step depends on more than the tables
(tests/test_device.py: no host reads, no copies, no table built in a planned step).

The dense-masked engine cannot be captured: its norms read the visible sites back (``nonzero``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .spark import MaskPlan, SparK

__all__ = ["GraphedStep"]


class GraphedStep:
    """``forward(images, plan)`` of ``model`` on one batch (a scalar, e.g. the loss) and, with
    ``backward``, its backward pass, captured on CUDA on the first batch and replayed on the next.

    A replay overwrites every gradient the capture made, in the same tensors (``param.grad``):
    step the optimizer between replays but never set gradients to None, or the captured
    gradients are no longer the parameters'. A later batch is best planned ``like`` the captured
    one (``model.plan(active, device, like=graphed.plan)``): its tables are then made ahead."""

    def __init__(self, model: SparK, forward: Callable[[Tensor, MaskPlan], Tensor], images: Tensor,
                 plan: MaskPlan, backward: bool = True, warmup: int = 3):
        if images.device.type != "cuda":
            raise ValueError(f"a CUDA graph needs the images on a CUDA device, not {images.device}")
        model.copy_plan_(plan, plan)  # refuses an engine or module that cannot be replayed, before any work
        self.model, self.forward, self.backward, self.plan = model, forward, backward, plan
        self.images = images.clone()
        # warm-up on a side stream, as CUDA graphs want: cuDNN's autotuning, the first batch's
        # tables, lazily made buffers and the autograd engine's streams all happen before capture
        kept = [b.clone() for b in model.buffers()]  # the warm-up leaves no trace in them
        side = torch.cuda.Stream(images.device)
        side.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                model.zero_grad(set_to_none=True)
                self._step()
        torch.cuda.current_stream(images.device).wait_stream(side)
        model.zero_grad(set_to_none=True)  # the capture's backward makes the gradients it replays into
        self.graph = torch.cuda.CUDAGraph()
        # thread-local: a DataLoader's pinning thread may call CUDA meanwhile
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.output = self._step()
        for buffer, value in zip(model.buffers(), kept):  # in place: the graph updates these tensors
            buffer.copy_(value)

    def _step(self) -> Tensor:
        out = self.forward(self.images, self.plan)
        if self.backward:
            out.backward()
        return out.detach()

    def __call__(self, images: Tensor, plan: MaskPlan) -> Tensor:
        """The step on ``images`` and ``plan`` (planned like ``self.plan``): their tensors copied
        into the captured ones, then the graph replayed; returns the step's output tensor (the
        same tensor every replay, overwritten)."""
        if images.shape != self.images.shape:
            raise ValueError(f"a replayed step needs images of the captured shape {tuple(self.images.shape)}, "
                             f"got {tuple(images.shape)}")
        if images is not self.images:
            self.images.copy_(images, non_blocking=True)
        if plan is not self.plan:
            self.model.copy_plan_(self.plan, plan)
        self.graph.replay()
        return self.output
