"""Step 1 of the data path: which patches of each image stay visible.

A mask is a boolean grid ``active`` of shape (B, 1, H/stride, W/stride) on the encoder's
coarsest grid (stride 32 for a ResNet); True marks a visible patch. Repeating it up to any finer
scale gives the visible set there, which is what keeps sparse and masked-dense encoding exact.
"""

from __future__ import annotations

import torch
from torch import Tensor


def random_active(
    batch: int,
    grid: tuple[int, int],
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Uniformly random visible patches: round(L * (1 - mask_ratio)) of the L patches per image."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    gh, gw = grid
    num_patches = gh * gw
    keep = max(1, round(num_patches * (1.0 - mask_ratio)))
    noise = torch.rand(batch, num_patches, generator=generator)
    order = noise.argsort(dim=1)[:, :keep]
    active = torch.zeros(batch, num_patches, dtype=torch.bool).scatter_(1, order, True)
    return active.view(batch, 1, gh, gw).to(device)


def upsample_active(active: Tensor, size: tuple[int, int]) -> Tensor:
    """Repeat the patch grid up to ``size`` (a multiple of the grid) — the visible set at that scale."""
    gh, gw = active.shape[-2:]
    h, w = size
    if h % gh or w % gw:
        raise ValueError(f"feature size {size} is not a multiple of the mask grid {(gh, gw)}")
    return active.repeat_interleave(h // gh, dim=-2).repeat_interleave(w // gw, dim=-1)


def check_patch_grid(size: int, grid: tuple[int, int]) -> None:
    """Refuse an adaptive pooling to ``size`` x ``size`` cells of a ``grid`` of patches other than one
    cell per patch (its cells would straddle patches, reading part of a hidden one)."""
    if tuple(grid) != (size, size):
        raise ValueError(f"adaptive average pooling to {size}x{size} pools one patch per cell on a {size}x{size} "
                         f"grid of patches only, got {grid[0]}x{grid[1]}: run the model at its own input size")


def check_inputs(images: Tensor, active: Tensor, stride: int) -> None:
    """Raise a ValueError that names the problem when images and mask cannot be encoded."""
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating-point tensor, got {images.dtype}")
    b, _, h, w = images.shape
    if b == 0:
        raise ValueError("images hold no image (a batch of 0)")
    if h % stride or w % stride:
        raise ValueError(f"image size {h}x{w} is not divisible by the encoder stride {stride}")
    if not isinstance(active, Tensor) or active.dtype != torch.bool:
        got = active.dtype if isinstance(active, Tensor) else type(active).__name__
        raise ValueError(f"active must be a bool tensor, got {got}")
    want = (b, 1, h // stride, w // stride)
    if tuple(active.shape) != want:
        raise ValueError(f"active must have shape {want} for images of shape {tuple(images.shape)}, "
                         f"got {tuple(active.shape)}")
    empty = (~active.flatten(1).any(dim=1)).nonzero().flatten()
    if len(empty):
        raise ValueError(f"image(s) {empty.tolist()} of the batch have no visible patch")
