"""Data-parallel pretraining across torchrun processes, on PyTorch's own distributed engine.

torchrun starts one process per device and describes the job in the environment (WORLD_SIZE,
RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). ``init_from_env`` joins that process group (gloo for
CPU tensors, NCCL for CUDA ones), DistributedDataParallel averages the gradients, and the batch
norms below take their statistics over the whole global batch, so N processes with B/N images
each compute what one process with all B images would.

``torch.nn.SyncBatchNorm`` refuses CPU tensors, so on CPU (gloo) ``SyncVisibleBatchNorm``
(encoders/sync_norm.py) is a BatchNorm whose training statistics are all-reduced; on CUDA
PyTorch's own fused SyncBatchNorm does the same job faster. Our norms are applied to visible
sites only (the feature rows of a sparse tensor, the visible rows of a densified map), so either
sees exactly the visible sites of the global batch. Both keep BatchNorm's parameter and buffer names: checkpoints and timm exports
are the same with and without synchronisation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..encoders.sync_norm import SyncVisibleBatchNorm, is_active, twin_of

T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job; the default is a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, exports, pictures and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def context() -> Context:
    if not is_active():
        return Context()
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def init_from_env(timeout_s: float | None = None) -> Context:
    """Join the process group torchrun describes (once; later calls just report it).

    A plain ``python -m`` launch, or torchrun with one process, stays single-process. One group
    serves both devices: gloo carries CPU tensors (and object collectives), NCCL CUDA tensors.
    ``timeout_s`` bounds every collective: when a rank freezes, the others fail after that long
    instead of waiting for good (None: PyTorch's default, 10 to 30 minutes by backend).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_active():
        cuda = torch.cuda.is_available() and dist.is_nccl_available()
        timeout = None if timeout_s is None else timedelta(seconds=float(timeout_s))
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timeout)
    return context()


def is_timeout(err: BaseException) -> bool:
    """Whether ``err`` is a collective that gave up waiting for another rank (the process
    group's timeout: that rank is frozen, dead or far behind)."""
    return isinstance(err, RuntimeError) and "timed out" in str(err).lower()


def shutdown() -> None:
    if is_active():
        dist.destroy_process_group()


def barrier() -> None:
    if is_active():
        dist.barrier()


def run_on_main(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 only. Every rank raises its exception, so a refusal (say, a missing
    checkpoint) stops the whole job rather than leaving the other ranks waiting; the result is
    returned on rank 0 and None elsewhere."""
    if not is_active():
        return fn()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - handed to every rank, then re-raised
            error = err
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise box[0]
    return result


def any_over_ranks(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (every rank gets the same answer)."""
    if not is_active():
        return flag
    box = torch.tensor([int(flag)])
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())


def gather_on_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` as a list on rank 0 (None elsewhere); [obj] in a single process."""
    if not is_active():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(value: Tensor) -> float:
    """The mean of a scalar over all ranks (gloo has no AVG reduction: sum, then divide)."""
    return averaged_over_ranks(value).item()


def averaged_over_ranks(value: Tensor) -> Tensor:
    """``mean_over_ranks`` left on the value's device, unread (float64: the mean of the ranks' own values)."""
    total = value.detach().to(torch.float64, copy=True)  # all_reduce works in place
    if not is_active():
        return total
    dist.all_reduce(total)
    return total / dist.get_world_size()


def total_over_ranks(value: Tensor) -> Tensor:
    """The sum of a CPU tensor over all ranks (not differentiable: counts, sums of losses)."""
    if not is_active():
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total


def broadcast_parameters(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank, as DistributedDataParallel's constructor
    hands them out."""
    if is_active():
        for parameter in module.parameters():
            dist.broadcast(parameter.data, src=0)
        broadcast_buffers(module)


def average_gradients(parameters: Iterable[Tensor]) -> None:
    """Every gradient replaced, in place, by its mean over the ranks, in one all-reduce of all of
    them: what DistributedDataParallel does during backward, done after it, for a backward
    replayed from a CUDA graph, where DDP's hooks do not run. Every rank must hold gradients for
    the same parameters."""
    if not is_active():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for grad, mean in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(mean.view_as(grad))


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) on every rank. DistributedDataParallel
    broadcasts them before each training forward only, so between steps every rank holds the
    statistics of its own last batch."""
    if is_active():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


_PLAIN_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _twin(norm: _BatchNorm) -> _BatchNorm:
    """The synchronised twin of ``norm``: an engine's own norm offers it (``synchronised()``);
    a plain torch BatchNorm becomes PyTorch's fused SyncBatchNorm on CUDA, ours on CPU."""
    synchronised = getattr(norm, "synchronised", None)
    if synchronised is not None:
        return synchronised()
    if type(norm) not in _PLAIN_NORMS:
        raise TypeError(f"no synchronised version of {type(norm).__name__}")
    on_cuda = any(t.is_cuda for t in [*norm.parameters(), *norm.buffers()])
    return twin_of(norm, nn.SyncBatchNorm if on_cuda else SyncVisibleBatchNorm)


def convert_sync_batchnorm(module: nn.Module, group: dist.ProcessGroup | None = None,
                           _path: str = "") -> nn.Module:
    """Replace every batch norm under ``module`` (in place) by its synchronised twin, with the
    same weights, buffers and state-dict keys; returns ``module``. Call it after moving the
    model to its device: CUDA norms become ``nn.SyncBatchNorm``, CPU ones ours.

    Covers MinkowskiEngine's MinkowskiBatchNorm (through the BatchNorm1d it holds as ``.bn``),
    densify's VisibleNorm, the decoder's BatchNorm2d and the dense-masked engine's norms.
    """
    for name, child in module.named_children():
        path = f"{_path}.{name}" if _path else name
        if isinstance(child, (SyncVisibleBatchNorm, nn.SyncBatchNorm)):
            continue
        if isinstance(child, _BatchNorm):
            try:
                twin = _twin(child)
            except TypeError as err:
                raise TypeError(f"{err} at '{path}'") from None
            twin.process_group = group
            setattr(module, name, twin)
        else:
            convert_sync_batchnorm(child, group, path)
    return module
