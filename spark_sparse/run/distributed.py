"""Data-parallel pretraining across torchrun processes, on PyTorch's own distributed engine.

torchrun starts one process per device and describes the job in the environment (WORLD_SIZE,
RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). ``init_from_env`` joins that process group (gloo for
CPU tensors, NCCL for CUDA ones), DistributedDataParallel averages the gradients, and the batch
norms below take their statistics over the whole global batch, so N processes with B/N images
each compute what one process with all B images would.

``torch.nn.SyncBatchNorm`` refuses CPU tensors, so on CPU (gloo) ``SyncVisibleBatchNorm`` is a
BatchNorm whose training statistics are all-reduced; on CUDA PyTorch's own fused SyncBatchNorm
does the same job faster. Our norms are applied to visible sites only (the feature rows of a
sparse tensor, the visible rows of a densified map), so either sees exactly the visible sites of
the global batch. Both keep BatchNorm's parameter and buffer names: checkpoints and timm exports
are the same with and without synchronisation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..encoders.masked_engine import MaskedBatchNorm2d

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


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized()


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
    if not is_active():
        return value.item()
    total = value.detach().clone()
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


def total_over_ranks(value: Tensor) -> Tensor:
    """The sum of a CPU tensor over all ranks (not differentiable: counts, sums of losses)."""
    if not is_active():
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) on every rank. DistributedDataParallel
    broadcasts them before each training forward only, so between steps every rank holds the
    statistics of its own last batch."""
    if is_active():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with its adjoint: every rank's input reaches every rank's output, so each
    input's gradient is the sum of all ranks' output gradients (another all_reduce)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_over_ranks(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Differentiable all-reduce sum (torch.distributed.nn's is deprecated and warns)."""
    return _SumOverRanks.apply(x, group)


class SyncVisibleBatchNorm(_BatchNorm):
    """BatchNorm over rows (N, C) or maps (N, C, ...) whose training statistics span all ranks.

    Each rank takes the mean and biased variance of its own rows (numerically stable), turns
    them into count, sum and sum of squares in float64 (no cancellation when they are combined),
    and all-reduces those; everyone then normalises with the global mean and biased variance and
    updates the running variance with the unbiased one, exactly as one BatchNorm over the
    concatenated batch. The all-reduce is differentiable, so backward is that BatchNorm's too.
    Outside training, or without a process group, it is a plain BatchNorm.
    """

    process_group: dist.ProcessGroup | None = None  # None: all ranks

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected (N, C) or (N, C, ...) input, got {x.dim()}D")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and is_active()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        rows = x.numel() // x.shape[1]
        if rows:
            var, mean = torch.var_mean(x, dim=dims, correction=0)
        else:  # a rank without visible sites still joins the all-reduce, with zeros
            var = mean = x.sum(dim=dims)
        count = torch.full_like(mean, rows, dtype=torch.float64)
        mean, var = mean.double(), var.double()
        total = sum_over_ranks(torch.stack([count, count * mean, count * (var + mean * mean)]),
                               self.process_group)
        n = total[0]  # kept on the device: no host synchronisation per layer
        g_mean = total[1] / n
        g_var = (total[2] / n - g_mean * g_mean).clamp_min(0.0)
        if self.track_running_stats:
            self._update_running_stats(g_mean.detach(), g_var.detach(), n)
        shape = [1, -1] + [1] * (x.dim() - 2)
        scale = torch.rsqrt(g_var + self.eps).to(x.dtype)
        if self.weight is not None:
            scale = scale * self.weight
        out = (x - g_mean.to(x.dtype).view(shape)) * scale.view(shape)
        return out if self.bias is None else out + self.bias.view(shape)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, n: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * n / (n - 1.0).clamp_min(1.0)
        self.running_mean.mul_(1.0 - f).add_(mean.to(self.running_mean.dtype), alpha=f)
        self.running_var.mul_(1.0 - f).add_(unbiased.to(self.running_var.dtype), alpha=f)


class SyncMaskedBatchNorm2d(MaskedBatchNorm2d, SyncVisibleBatchNorm):
    """The dense-masked engine's norm, synchronised: MaskedBatchNorm2d gathers the visible sites
    and calls ``super().forward``, which this class order resolves to SyncVisibleBatchNorm."""


_PLAIN_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _sync_class(norm: _BatchNorm, on_cuda: bool) -> type | None:
    """The synchronised class for ``norm``, None for a batch norm we do not know."""
    if type(norm) is MaskedBatchNorm2d:
        return SyncMaskedBatchNorm2d
    if type(norm) in _PLAIN_NORMS:
        # on CUDA, PyTorch's SyncBatchNorm: fused kernels, where ours costs many small launches
        return nn.SyncBatchNorm if on_cuda else SyncVisibleBatchNorm
    return None


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
            ref = next(iter([*child.parameters(), *child.buffers()]), None)
            twin_cls = _sync_class(child, ref is not None and ref.is_cuda)
            if twin_cls is None:
                raise TypeError(f"no synchronised version of {type(child).__name__} at '{path}'")
            # bias=False exists only in newer torch: pass it only for a norm that has no bias
            no_bias = {"bias": False} if child.affine and child.bias is None else {}
            twin = twin_cls(child.num_features, eps=child.eps, momentum=child.momentum,
                            affine=child.affine, track_running_stats=child.track_running_stats,
                            device=None if ref is None else ref.device, **no_bias)
            twin.load_state_dict(child.state_dict())
            twin.process_group = group
            twin.train(child.training)
            setattr(module, name, twin)
        else:
            convert_sync_batchnorm(child, group, path)
    return module


class SharedRunDir(Callback):
    """Hydra callback: under torchrun every process runs the hydra app; all of them take rank
    0's run directory (``${now:...}`` can tick between processes, even between machines). A
    single process is left alone. (Rank 0 alone writes the .hydra/ config record, in train.)"""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        ctx = init_from_env(config.get("dist_timeout_s"))
        if not ctx.distributed:
            return
        run_dir = broadcast_from_main(str(config.hydra.run.dir) if ctx.is_main else None)
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.run.dir = run_dir
