"""Reconstruction pictures: original | masked input | reconstruction (visible patches pasted back),
drawn by the pretraining app during a run and by ``python -m spark_sparse.visualize`` for any
checkpoint (spark_sparse/analysis/visualize.py)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: pictures go to files
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from ..data.images import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from ..model.loss import reconstruct  # noqa: E402
from ..mask import random_active, upsample_active  # noqa: E402
from ..model.spark import SparK  # noqa: E402


def to_rgb(images: Tensor) -> Tensor:
    """Undo the ImageNet normalisation: (B, 3, H, W) -> (B, H, W, 3) in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1)


@torch.no_grad()
def save_reconstruction(model: SparK, images: Tensor, path: str | Path, seed: int = 0,
                        title: str | None = None) -> Path:
    """Draw one row per image; the mask comes from ``seed``, not from the model's generator."""
    was_training = model.training
    model.eval()
    try:
        b, _, h, w = images.shape
        grid = (h // model.stride, w // model.stride)
        active = random_active(b, grid, model.mask_ratio, torch.Generator().manual_seed(seed), images.device)
        out = model(images, active)
        recon = reconstruct(out["pred"], images, active, model.stride)
        masked = images * upsample_active(active, (h, w))
    finally:
        model.train(was_training)
    columns = {"original": images, "masked input": masked, "reconstruction": recon}
    fig, axes = plt.subplots(b, 3, figsize=(9, 3 * b), squeeze=False)
    for col, (name, batch) in enumerate(columns.items()):
        for row, img in enumerate(to_rgb(batch)):
            axes[row, col].imshow(img.numpy())
            axes[row, col].axis("off")
        axes[0, col].set_title(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
