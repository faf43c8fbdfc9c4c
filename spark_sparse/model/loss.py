"""Step 6: reconstruction loss on hidden patches, against per-patch normalised targets."""

from __future__ import annotations

import torch
from torch import Tensor

from ..mask import upsample_active
from ..precision import statistics_dtype

EPS = 1e-6


def patchify(x: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, L, patch*patch*C), patches in row-major order of the patch grid."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(x: Tensor, patch: int, grid: tuple[int, int]) -> Tensor:
    b, _, d = x.shape
    c = d // (patch * patch)
    gh, gw = grid
    x = x.reshape(b, gh, gw, patch, patch, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, gh * patch, gw * patch)


def normalise_patches(patches: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each patch minus its mean over its own pixels, over its std (eps 1e-6)."""
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + EPS).sqrt()
    return (patches - mean) / std, mean, std


def masked_patch_loss(pred: Tensor, images: Tensor, active: Tensor, patch: int) -> Tensor:
    """Mean squared error per patch, averaged over the hidden patches of the batch; in float32 (or
    float64) whatever the prediction's dtype: under autocast the decoder's output is 16-bit."""
    dtype = statistics_dtype(torch.promote_types(pred.dtype, images.dtype))
    pred, images = pred.to(dtype), images.to(dtype)
    target, _, _ = normalise_patches(patchify(images, patch))
    per_patch = (patchify(pred, patch) - target).pow(2).mean(dim=-1)  # (B, L)
    hidden = (~active).flatten(1).to(per_patch.dtype)
    return (per_patch * hidden).sum() / hidden.sum().clamp_min(1.0)


def reconstruct(pred: Tensor, images: Tensor, active: Tensor, patch: int) -> Tensor:
    """Prediction mapped back to pixel space with each target patch's statistics, visible
    patches pasted from the input: what the model 'sees' plus what it fills in."""
    grid = active.shape[-2:]
    _, mean, std = normalise_patches(patchify(images, patch))
    filled = unpatchify(patchify(pred, patch) * std + mean, patch, grid)
    return torch.where(upsample_active(active, images.shape[-2:]), images, filled)
