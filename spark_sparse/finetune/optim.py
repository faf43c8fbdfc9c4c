"""Fine-tuning's optimisation: timm's optimiser with layer-wise lr decay, and the loss (mixup's soft
targets or label smoothing)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
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
