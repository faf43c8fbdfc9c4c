"""Step 5: the light UNet-style decoder that reconstructs pixels from all densified scales."""

from __future__ import annotations

import math

from torch import Tensor, nn


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


class LightDecoder(nn.Module):
    """Width ``width`` at the coarsest scale, halving per block, up to full resolution."""

    def __init__(self, width: int = 768, stride: int = 32, out_channels: int = 3):
        super().__init__()
        n = round(math.log2(stride))
        if 2**n != stride or width % 2**n:
            raise ValueError(f"decoder width {width} must be divisible by {2 ** n} (stride {stride})")
        self.widths = [width // 2**i for i in range(n + 1)]
        self.blocks = nn.ModuleList(UpBlock(a, b) for a, b in zip(self.widths[:-1], self.widths[1:]))
        self.head = nn.Conv2d(self.widths[-1], out_channels, kernel_size=1)

    def forward(self, features: list[Tensor | None]) -> Tensor:
        """``features[i]``: the densified scale entering block i (coarsest first) or None."""
        x = 0
        for i, block in enumerate(self.blocks):
            if i < len(features) and features[i] is not None:
                x = x + features[i]
            x = block(x)
        return self.head(x)
