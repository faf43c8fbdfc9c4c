"""Fine-tuning's recipe parts, all timm's: the optimiser with layer-wise lr decay, the per-step
cosine schedule, the EMA model, mixup, and the loss (mixup's soft targets or label smoothing)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn

from ..run.recipe import scaled_lr


def mixing(cfg: DictConfig) -> bool:
    return cfg.mixup.prob > 0 and (cfg.mixup.mixup_alpha > 0 or cfg.mixup.cutmix_alpha > 0)


def build_optimizer(model: nn.Module, cfg: DictConfig) -> torch.optim.Optimizer:
    """timm's optimiser over what is trained (the head alone in linear mode), with layer-wise lr
    decay groups from the model's own group_matcher, and no weight decay on biases and norms."""
    trained = model.head if cfg.mode == "linear" else model
    lr = cfg.optim.lr if cfg.optim.lr is not None else scaled_lr(cfg.optim.base_lr, cfg.batch_size)
    extra = {"momentum": cfg.optim.momentum} if cfg.optim.name in ("sgd", "momentum") else {}
    return create_optimizer_v2(trained, opt=cfg.optim.name, lr=lr, weight_decay=cfg.optim.weight_decay,
                               layer_decay=cfg.optim.layer_decay, **extra)


def criterion(cfg: DictConfig) -> nn.Module:
    """Mixup's soft targets (label smoothing folded in), else smoothed or plain cross-entropy."""
    if mixing(cfg):
        return SoftTargetCrossEntropy()
    if cfg.mixup.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.mixup.label_smoothing)
    return nn.CrossEntropyLoss()


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: DictConfig, steps_per_epoch: int) -> Scheduler:
    """A per-step cosine schedule with warm-up; a short run's warm-up takes at most a quarter of it."""
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=cfg.epochs, min_lr=cfg.optim.min_lr,
                                       warmup_epochs=min(cfg.optim.warmup_epochs, cfg.epochs / 4),
                                       warmup_lr=cfg.optim.min_lr, step_on_epochs=False,
                                       updates_per_epoch=steps_per_epoch)
    return scheduler


def build_ema(model: nn.Module, cfg: DictConfig) -> ModelEmaV3 | None:
    """timm's EMA of the weights (``ema.decay``; None: none)."""
    return ModelEmaV3(model, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup) if cfg.ema.decay is not None else None


def build_mixup(cfg: DictConfig, num_classes: int) -> Mixup | None:
    """timm's mixup/cutmix with label smoothing folded into its soft targets (None: off)."""
    if not mixing(cfg):
        return None
    return Mixup(mixup_alpha=cfg.mixup.mixup_alpha, cutmix_alpha=cfg.mixup.cutmix_alpha, prob=cfg.mixup.prob,
                 label_smoothing=cfg.mixup.label_smoothing, num_classes=num_classes)
