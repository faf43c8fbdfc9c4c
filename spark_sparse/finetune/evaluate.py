"""Evaluation of a classifier: top-1, top-5 and loss over a labelled set, shared out over processes."""

from __future__ import annotations

import torch
from torch import nn

from ..precision import autocast
from ..run import distributed
from .data import InOrder, Labelled, loader


@torch.inference_mode()
def evaluate(model: nn.Module, data: Labelled, batch_size: int, device: torch.device,
             num_workers: int = 0, precision: str = "fp32") -> dict[str, float]:
    """Top-1 and top-5 accuracy (in %) and cross-entropy of ``model`` on ``data``, in eval mode
    and in the training's ``precision`` (the loss from float32 logits); unreadable images are
    left out. Under torchrun every process evaluates its share with rank
    0's weights and statistics and the counts are summed: the numbers are one process's."""
    ctx = distributed.context()
    distributed.broadcast_buffers(model)
    was_training = model.training
    model.eval()
    k = min(5, len(data.classes))
    counts = torch.zeros(4, dtype=torch.float64)  # images, top-1 hits, top-k hits, loss sum
    for batch in loader(data, InOrder(len(data), batch_size, ctx.rank, ctx.world_size), num_workers):
        if batch is None:  # every image of this batch was unreadable
            continue
        images, targets = batch[0].to(device), batch[1].to(device)
        with autocast(precision, device.type):
            logits = model(images)
        logits = logits.float()
        hits = logits.topk(k, dim=1).indices == targets[:, None]
        counts += torch.tensor([len(targets), hits[:, 0].sum().item(), hits.any(dim=1).sum().item(),
                                nn.functional.cross_entropy(logits, targets, reduction="sum").item()],
                               dtype=torch.float64)
    model.train(was_training)
    total, top1, top5, loss = distributed.total_over_ranks(counts).tolist()
    return {"top1": 100.0 * top1 / total, "top5": 100.0 * top5 / total, "loss": loss / total}
