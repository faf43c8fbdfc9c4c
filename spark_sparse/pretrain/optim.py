"""The paper's optimisation: timm's LAMB (or AdamW), warmup + cosine lr, cosine weight-decay ramp.

Biases, norms (1-D parameters), mask tokens and what the encoder's timm model exempts by name
(position tables, as SparK's ``pos_embed``; ``optim.timm_no_weight_decay``) get no weight decay,
grouped as timm groups them; lr = base_lr * batch_size / 256.
"""

from __future__ import annotations

import math

from omegaconf import DictConfig
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch.optim import Optimizer

from ..model.spark import SparK
from ..run.recipe import scaled_lr

OPTIMIZERS = ("lamb", "adamw")


def build_optimizer(model: SparK, cfg: DictConfig, batch_size: int) -> Optimizer:
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got '{cfg.name}'")
    kwargs = {"betas": tuple(cfg.betas)}
    if cfg.name == "lamb":
        kwargs["max_grad_norm"] = None  # we clip the global norm ourselves (optim.clip_grad)
    exempt = model.no_weight_decay() if cfg.timm_no_weight_decay else model.mask_tokens()
    groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=exempt)
    return create_optimizer_v2(groups, opt=cfg.name, lr=scaled_lr(cfg.base_lr, batch_size), **kwargs)


def build_scheduler(optimizer: Optimizer, cfg: DictConfig, max_steps: int, warmup_steps: int) -> CosineLRScheduler:
    """Per-step schedule: linear warmup from 0, then cosine decay to optim.min_lr at max_steps."""
    return CosineLRScheduler(optimizer, t_initial=max(max_steps - warmup_steps, 1), lr_min=cfg.min_lr,
                             warmup_t=warmup_steps, warmup_lr_init=0.0, warmup_prefix=True,
                             t_in_epochs=False)


def weight_decay_at(step: int, max_steps: int, start: float, end: float) -> float:
    """Cosine ramp of the weight decay from ``start`` to ``end`` over training."""
    progress = min(step / max(max_steps, 1), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_weight_decay(optimizer: Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        if group["weight_decay"] > 0.0:  # the no-decay groups stay at zero
            group["weight_decay"] = value
