"""Step 4: each encoder scale becomes a full dense map for the decoder.

Per scale: a norm over the visible sites, a learned mask token at every hidden site (one vector
per scale), then a projection to the decoder's width at that scale.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

NORMS = ("bn", "ln", "none")


def visible_sites(visible: Tensor) -> Tensor:
    """The flat (image, row, column) indices of the sites where ``visible`` (B, 1, h, w) is true.
    On a GPU mask this reads the device on the host (a wait); made from the CPU mask and copied,
    it is one more queued copy."""
    return visible.reshape(-1).nonzero()[:, 0]


class VisibleNorm(nn.Module):
    """BatchNorm or LayerNorm over the channel vectors of visible sites only."""

    def __init__(self, kind: str, channels: int):
        super().__init__()
        if kind not in NORMS:
            raise ValueError(f"densify norm must be one of {NORMS}, got '{kind}'")
        self.kind = kind
        if kind == "bn":
            self.norm = nn.BatchNorm1d(channels)
        elif kind == "ln":
            self.norm = nn.LayerNorm(channels, eps=1e-6)
        else:
            self.norm = nn.Identity()

    def forward(self, x: Tensor, visible: Tensor, sites: Tensor | None = None) -> Tensor:
        """``sites``: ``visible_sites(visible)``, best made where the mask was made (the CPU)."""
        if self.kind == "none":
            return x
        if sites is None:
            sites = visible_sites(visible)
        b, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, c).index_select(0, sites)
        rows = self.norm(rows)  # float32 under CUDA autocast for a layer norm
        out = rows.new_zeros(b * h * w, c).index_copy(0, sites, rows)
        return out.view(b, h, w, c).permute(0, 3, 1, 2)


class Densify(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, norm: str = "bn", kernel_size: int = 3):
        super().__init__()
        self.norm = VisibleNorm(norm, in_channels)
        self.mask_token = nn.Parameter(torch.zeros(1, in_channels, 1, 1))
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)
        if in_channels == out_channels and kernel_size == 1:
            self.proj = nn.Identity()
        else:
            self.proj = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor, visible: Tensor, sites: Tensor | None = None) -> Tensor:
        """``x`` (B, C, h, w) with zeros at hidden sites, ``visible`` (B, 1, h, w) bool, ``sites``
        its ``visible_sites``."""
        x = self.norm(x, visible, sites)
        x = torch.where(visible, x, self.mask_token.to(x.dtype))
        return self.proj(x)
