"""GhostNetV2's and V3's DFC attention on visible sites, for both engines.

A ghost module with DFC attention multiplies its output by a gate made from its input: a 2x2
average pooling, then on the pooled cells a 1x1 conv-norm, a depthwise 1x5 conv-norm and a
depthwise 5x1 conv-norm (timm's ``short_conv``), a sigmoid, and a nearest upsampling back to the
map's size. Here the gate is made on the whole images' map of the input, zeros at hidden sites, as
the dense-masked engine holds it: a cell averages its four sites, a hidden one adding zero. A cell
holding a visible site is visible; the norms take their statistics over the visible cells only and
leave the hidden cells zero (their gate a sigmoid of 0), so the depthwise convolutions read zeros
there, as at the map's border. Up to stride 16 a cell lies in one patch, so a cell is visible
exactly where its sites are; at stride 32 a cell is 2x2 patches. Both engines run this one
computation (sparse: the rows scattered into the map and the gate gathered back), so they agree
to the last bit; with nothing hidden it is timm's.

The statistics are masked sums over the fixed-size pooled map (no gather of a data-dependent
number of cells, no read back: a CUDA graph can replay it), all-reduced under torchrun once the
run layer has made the norms synchronised. On a map of odd size timm's pooling leaves out the last
row and column and its upsampling stretches the cells unevenly (3 over 7 sites at stride 32 for
224 px): an image's gate then depends on its map's size, in timm as here.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..sync_norm import SyncVisibleBatchNorm, combine_over_ranks, is_active, update_running_stats


class DfcGate(nn.Module):
    """timm's ``short_conv`` (children 0..5: conv, norm, conv, norm, conv, norm, timm's names) and
    the gate it makes; each engine's twin runs it on its own tensors (``forward(x, out)``: ``out``
    times the gate made from ``x``)."""

    def __init__(self, short_conv: nn.Module):
        super().__init__()
        modules = list(short_conv.children())
        kinds = [type(m) for m in modules]
        if kinds != [nn.Conv2d, nn.BatchNorm2d] * 3:
            raise TypeError(f"a DFC branch of {', '.join(k.__name__ for k in kinds)} is not GhostNetV2's")
        for i, module in enumerate(modules):
            self.add_module(str(i), copy.deepcopy(module))  # the encoder shares no tensor with timm's model

    def gate(self, canvas: Tensor, visible: Tensor) -> Tensor:
        """The (B, C_out, h, w) gate of the (B, C_in, h, w) map ``canvas`` (zeros at hidden sites),
        ``visible`` its (B, 1, h, w) sites holding a row, as 0/1 in its dtype."""
        y = F.avg_pool2d(canvas, kernel_size=2, stride=2)
        cells = F.max_pool2d(visible, kernel_size=2, stride=2)
        for i in (0, 2, 4):
            conv, norm = self._modules[str(i)], self._modules[str(i + 1)]
            y = cell_norm(norm, conv(y), cells)
        return F.interpolate(torch.sigmoid(y), size=canvas.shape[-2:], mode="nearest")


def cell_norm(norm: _BatchNorm, y: Tensor, cells: Tensor) -> Tensor:
    """``norm`` (a BatchNorm2d or its synchronised twin) over the cells of ``y`` where ``cells`` is
    1, zero where it is 0; the statistics in float32 at least."""
    dims = (0, 2, 3)
    dtype = torch.promote_types(y.dtype, torch.float32)
    y32, m = y.to(dtype), cells.to(dtype)
    if norm.training or norm.running_mean is None:
        count = m.sum()
        mean = (y32 * m).sum(dims) / count
        var = ((y32 - mean[:, None, None]).square() * m).sum(dims) / count
        if norm.training and isinstance(norm, (SyncVisibleBatchNorm, nn.SyncBatchNorm)) and is_active():
            n, mean, var = combine_over_ranks(count.double().expand_as(mean), mean, var, norm.process_group)
            mean, var = mean.to(dtype), var.to(dtype)
        else:
            n = count
        if norm.training and norm.track_running_stats:
            update_running_stats(norm, mean.detach(), var.detach(), n.detach())
    else:
        mean, var = norm.running_mean.to(dtype), norm.running_var.to(dtype)
    scale = torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.to(dtype)
    out = (y32 - mean[:, None, None]) * scale[:, None, None]
    if norm.bias is not None:
        out = out + norm.bias.to(dtype)[:, None, None]
    return (out * m).to(y.dtype)
