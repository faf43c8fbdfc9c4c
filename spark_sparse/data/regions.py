"""Disjoint regions of a photo for held-out evaluation: train crops from its left part, held-out
crops from its right part, so no pixel is shared (the linear probe's and the bundled fine-tuning
task's split)."""

from __future__ import annotations

import torch

SPLIT = 0.6  # train crops left of this fraction of the width, test crops right of it
SIZE_RANGE = (0.5, 1.0)  # crop side as a fraction of the narrower part's usable side

Box = tuple[int, int, int]  # (left, top, side) of a square crop in image pixels


def split_column(width: int) -> int:
    """First column of the held-out (right) part."""
    return max(1, min(width - 1, round(SPLIT * width)))


def crop_boxes(width: int, height: int, split: str, count: int, seed: int) -> list[Box]:
    """``count`` square crops inside the ``split`` ('train' = left, 'test' = right) part."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    cut = split_column(width)
    x0, x1 = (0, cut) if split == "train" else (cut, width)
    # the same side range for both parts: set by the narrower one, so only location differs
    largest = min(cut, width - cut, height)
    g = torch.Generator().manual_seed(seed)
    boxes = []
    for _ in range(count):
        u = torch.empty(1, dtype=torch.float64).uniform_(*SIZE_RANGE, generator=g).item()
        side = max(1, round(u * largest))
        left = x0 + int(torch.randint(0, x1 - x0 - side + 1, (1,), generator=g))
        top = int(torch.randint(0, height - side + 1, (1,), generator=g))
        boxes.append((left, top, side))
    return boxes
