"""Step 5: the light UNet-style decoder that reconstructs pixels from all densified scales."""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.checkpoint import checkpoint


class UpBlock(nn.Module):
    """2x transposed-conv upsampling, then conv3x3-BN-ReLU6-conv3x3-BN."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels, kernel_size=4, stride=2, padding=1)
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU6(inplace=True),
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.up(x))


@contextmanager
def statistics_kept(module: nn.Module) -> Iterator[None]:
    """Within it the batch norms of ``module`` leave their running statistics (and batch count) as
    they are: a recomputation in backward must not count its batch a second time."""
    norms = [m for m in module.modules() if isinstance(m, _NormBase) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def recomputed(block: nn.Module, x: Tensor) -> Tensor:
    """``block(x)`` keeping only its input for backward, which runs the block again (activation
    checkpointing) without moving its norms' statistics twice."""
    return checkpoint(block, x, use_reentrant=False, context_fn=lambda: (nullcontext(), statistics_kept(block)))


class LightDecoder(nn.Module):
    """Width ``width`` at the coarsest scale, halving per block, up to full resolution. With
    ``checkpoint`` a training pass keeps each block's input alone and makes the rest again in
    backward: the same result for less memory (the finest blocks' maps dominate a step's)."""

    def __init__(self, width: int = 768, stride: int = 32, out_channels: int = 3, checkpoint: bool = False):
        super().__init__()
        n = round(math.log2(stride))
        if 2**n != stride or width <= 0 or width % 2**n:
            raise ValueError(f"decoder width {width} must be a positive multiple of {2 ** n} (stride {stride})")
        self.widths = [width // 2**i for i in range(n + 1)]
        self.blocks = nn.ModuleList(UpBlock(a, b) for a, b in zip(self.widths[:-1], self.widths[1:]))
        self.head = nn.Conv2d(self.widths[-1], out_channels, kernel_size=1)
        self.checkpoint = checkpoint

    def forward(self, features: list[Tensor | None]) -> Tensor:
        """``features[i]``: the densified scale entering block i (coarsest first) or None."""
        recompute = self.checkpoint and self.training and torch.is_grad_enabled()
        x = 0
        for i, block in enumerate(self.blocks):
            if i < len(features) and features[i] is not None:
                x = x + features[i]
            x = recomputed(block, x) if recompute else block(x)
        return self.head(x)
