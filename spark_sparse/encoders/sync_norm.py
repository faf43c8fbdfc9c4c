"""Batch norms whose training statistics span every process of a torchrun job: the building block of
each engine's synchronised norms (and of the model's, which are torch's own BatchNorms).

``torch.nn.SyncBatchNorm`` refuses CPU tensors, so on CPU (gloo) ``SyncVisibleBatchNorm`` is a
BatchNorm whose statistics are all-reduced. An engine norm that is not a plain torch BatchNorm
offers its twin through ``synchronised()`` (the run layer converts a model's norms with it), so
the engines keep their norms' details to themselves.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm


def is_active() -> bool:
    """Whether this process is part of a process group (under torchrun)."""
    return dist.is_available() and dist.is_initialized()


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
        n, g_mean, g_var = combine_over_ranks(count, mean, var, self.process_group)
        if self.track_running_stats:
            update_running_stats(self, g_mean.detach(), g_var.detach(), n)
        shape = [1, -1] + [1] * (x.dim() - 2)
        scale = torch.rsqrt(g_var + self.eps).to(x.dtype)
        if self.weight is not None:
            scale = scale * self.weight
        out = (x - g_mean.to(x.dtype).view(shape)) * scale.view(shape)
        return out if self.bias is None else out + self.bias.view(shape)


def combine_over_ranks(count: Tensor, mean: Tensor, var: Tensor,
                       group: dist.ProcessGroup | None) -> tuple[Tensor, Tensor, Tensor]:
    """(n, mean, biased variance) of every rank's rows together, from each rank's count, mean and
    biased variance per channel: all-reduced as count, sum and sum of squares in float64 (no
    cancellation when they are combined), differentiably. ``n`` stays on the device: no host
    synchronisation per layer."""
    mean, var = mean.double(), var.double()
    total = sum_over_ranks(torch.stack([count, count * mean, count * (var + mean * mean)]), group)
    n = total[0]
    g_mean = total[1] / n
    return n, g_mean, (total[2] / n - g_mean * g_mean).clamp_min(0.0)


@torch.no_grad()
def update_running_stats(norm: _BatchNorm, mean: Tensor, var: Tensor, n: Tensor) -> None:
    """``norm``'s running statistics after a batch of ``n`` rows with this mean and biased
    variance, as torch's BatchNorm updates them (the unbiased variance; momentum, or a
    cumulative average where it is None)."""
    norm.num_batches_tracked.add_(1)
    f = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    unbiased = var * n / (n - 1.0).clamp_min(1.0)
    norm.running_mean.mul_(1.0 - f).add_(mean.to(norm.running_mean.dtype), alpha=f)
    norm.running_var.mul_(1.0 - f).add_(unbiased.to(norm.running_var.dtype), alpha=f)


def twin_of(norm: _BatchNorm, cls: type[_BatchNorm], **extra: Any) -> _BatchNorm:
    """A ``cls`` with ``norm``'s settings, weights, buffers, device and mode (``extra``: further
    constructor arguments): the synchronised twin of a norm, with the same state-dict keys."""
    ref = next(iter([*norm.parameters(), *norm.buffers()]), None)
    # bias=False exists only in newer torch: pass it only for a norm that has no bias
    no_bias = {"bias": False} if norm.affine and norm.bias is None else {}
    twin = cls(norm.num_features, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
               track_running_stats=norm.track_running_stats, device=None if ref is None else ref.device,
               **no_bias, **extra)
    twin.load_state_dict(norm.state_dict())
    return twin.train(norm.training)
