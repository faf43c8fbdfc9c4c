"""Sparse convolutions as matrix products over gathered rows (patch_conv.py's paths for small blocks).

* offset GEMMs: MinkowskiEngine's own algorithm (per kernel offset: gather, GEMM, scatter-add)
  with kernel maps cut from the patch grid (``PatchSites.pairs``) and torch's GEMMs. Absent
  neighbours cost nothing, which at 1-2 sites per block skips about half of the arithmetic.
* window GEMMs (im2col by table, ``PatchSites.windows``): each output site's whole window
  gathered, absent neighbours as a zero row, and one GEMM (batched over the groups of a grouped
  convolution). It computes what offset GEMMs skip, but queues a few operations where offset
  GEMMs queue three or more per kernel offset: on a GPU, where launching a kernel costs the CPU
  about what running a small one costs the GPU, the operations queued, not the arithmetic,
  bound the deeper stages.
* pointwise: a 1x1 convolution, the rows times the kernel.

Each keeps only its input rows for backward (or none: row_saving.py); sums over kernel offsets
and windows of 16-bit rows are taken in float32, as a GEMM's are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..precision import statistics_dtype
from .amp import autocast_backward, autocast_forward
from .patch_sites import OffsetPairs
from .row_saving import save_rows, saved_rows

# how k x k convolutions over blocks smaller than a tile's run, per device type: on a GPU the
# operations queued cost more than the arithmetic that offset GEMMs skip (see the module's docstring)
SMALL_BLOCK_PATHS = {"cpu": "offsets"}


def small_block_path(device: torch.device) -> str:
    """'offsets' or 'windows': the path of small blocks on ``device`` (window GEMMs off the CPU)."""
    return SMALL_BLOCK_PATHS.get(device.type, "windows")


def select_rows(t: Tensor, index: Tensor | None) -> Tensor:
    return t if index is None else t.index_select(0, index)


def accumulate_rows(out: Tensor | None, index: Tensor | None, values: Tensor, n: int) -> Tensor:
    """out[index] += values (index None: every row), allocating ``out`` (n rows) on first use, in
    float32 for 16-bit values: a sum over kernel offsets rounds once, at the end, as a GEMM's does."""
    values = values.to(statistics_dtype(values.dtype))
    if out is None:
        if index is None:
            return values
        out = values.new_zeros(n, values.shape[1])
    return out.add_(values) if index is None else out.index_add_(0, index, values)


class OffsetGemm(torch.autograd.Function):
    """A sparse convolution as one GEMM per kernel offset over its present pairs only."""

    @staticmethod
    @autocast_forward
    def forward(ctx, feats: Tensor, kernel: Tensor, pairs: list[OffsetPairs], n_out: int) -> Tensor:
        save_rows(ctx, feats, kernel)
        ctx.pairs = pairs
        out = None
        for k, o, i in pairs:
            out = accumulate_rows(out, o, select_rows(feats, i) @ kernel[k], n_out)
        return out.to(feats.dtype)

    @staticmethod
    @autocast_backward
    def backward(ctx, grad_out: Tensor):
        feats, kernel = saved_rows(ctx)
        grad_out = grad_out.contiguous()
        need_feats, need_kernel = ctx.needs_input_grad[:2]
        grad_feats = None
        grad_kernel = torch.empty_like(kernel) if need_kernel else None
        for k, o, i in ctx.pairs:
            g = select_rows(grad_out, o)
            if need_kernel:
                torch.mm(select_rows(feats, i).t(), g, out=grad_kernel[k])
            if need_feats:
                grad_feats = accumulate_rows(grad_feats, i, g @ kernel[k].t(), feats.shape[0])
        return None if grad_feats is None else grad_feats.to(feats.dtype), grad_kernel, None, None


def with_zero_row(rows: Tensor) -> Tensor:
    """(N + 1, C): ``rows`` and a zero row N, where a table's absent entries point. One kernel
    (a padding), where concatenating a new zero row queues two."""
    return F.pad(rows, (0, 0, 0, 1))


def gather_windows(feats: Tensor, windows: Tensor, groups: int = 1) -> Tensor:
    """Each output site's window of input rows, a zero row where absent (row N): (N_out, K * C),
    or per group (G, N_out, K * C / G)."""
    cols = with_zero_row(feats).index_select(0, windows.view(-1))
    if groups == 1:
        return cols.view(windows.shape[0], -1)
    n, k = windows.shape
    return cols.view(n, k, groups, -1).permute(2, 0, 1, 3).reshape(groups, n, -1)


class WindowGemm(torch.autograd.Function):
    """A sparse convolution as one GEMM over every output site's window (``PatchSites.windows``),
    one per group batched: ``kernel`` (G, K * C_in / G, C_out / G), windows' offsets outermost.
    Backward gathers the windows again rather than keeping them (K times the input rows)."""

    @staticmethod
    @autocast_forward
    def forward(ctx, feats: Tensor, kernel: Tensor, windows: Tensor) -> Tensor:
        save_rows(ctx, feats, kernel)
        ctx.windows = windows
        g = kernel.shape[0]
        if g == 1:
            return gather_windows(feats, windows) @ kernel[0]
        out = torch.bmm(gather_windows(feats, windows, g), kernel)  # (G, N_out, C_out / G)
        return out.transpose(0, 1).reshape(windows.shape[0], -1)

    @staticmethod
    @autocast_backward
    def backward(ctx, grad_out: Tensor):
        feats, kernel = saved_rows(ctx)
        windows, (n, c), g = ctx.windows, feats.shape, kernel.shape[0]
        need_feats, need_kernel = ctx.needs_input_grad[:2]
        grad_out = grad_out.contiguous()
        # (G, N_out, C_out / G); one group needs no transpose, which on a GPU is one more dispatch
        go = grad_out.view(1, -1, grad_out.shape[1]) if g == 1 else grad_out.view(-1, g, kernel.shape[2]).transpose(0, 1)
        grad_kernel = None
        if need_kernel:
            cols = gather_windows(feats, windows, g).view(g, windows.shape[0], -1)
            grad_kernel = torch.bmm(cols.transpose(1, 2), go)
        grad_feats = None
        if need_feats:
            # a row's gradient sums over every window holding it: in float32 for 16-bit rows, as
            # offset GEMMs sum their offsets
            grad_cols = torch.bmm(go, kernel.transpose(1, 2))  # (G, N_out, K * C_in / G)
            k = windows.shape[1]
            grad_cols = grad_cols.view(g, -1, k, c // g).permute(1, 2, 0, 3).reshape(-1, c)
            grad_cols = grad_cols.to(statistics_dtype(grad_cols.dtype))
            grad_feats = grad_cols.new_zeros(n + 1, c).index_add_(0, windows.view(-1), grad_cols)
            grad_feats = grad_feats[:n].to(feats.dtype)
        return grad_feats, grad_kernel, None


class Pointwise(torch.autograd.Function):
    """A 1x1 convolution: the rows times a (C_in, C_out) kernel."""

    @staticmethod
    @autocast_forward
    def forward(ctx, feats: Tensor, kernel: Tensor) -> Tensor:
        save_rows(ctx, feats, kernel)
        return feats @ kernel

    @staticmethod
    @autocast_backward
    def backward(ctx, grad_out: Tensor):
        feats, kernel = saved_rows(ctx)
        need_feats, need_kernel = ctx.needs_input_grad
        return (grad_out @ kernel.t() if need_feats else None,
                feats.t() @ grad_out if need_kernel else None)
