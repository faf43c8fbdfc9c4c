"""What a fine-tuning config must satisfy, checked before any data is read or anything written:
every key's type and range (``KEYS``), then the rules that tie keys together."""

from __future__ import annotations

import timm
import torch
from omegaconf import DictConfig
from timm.optim import list_optimizers

from ..encoders.families import input_sizes
from ..timm_models import create_timm_model
from ..run.recipe import timm_input_size
from ..run.checks import RUN_KEYS, ConfigError, check_model_and_missing, check_runtime
from ..run.schema import (FLAG, FRACTION, NON_NEGATIVE, NULL, POSITIVE, PROBABILITY, TEXT, Rule, at_least,
                          check_keys, number, numbers, one_of)
from .optim import mixing

OPEN_FRACTION = number("in (0, 1)", lambda v: 0 < v < 1)

KEYS = {
    **RUN_KEYS,
    "mode": one_of("finetune", "linear"),
    "pretrained": TEXT | NULL,
    "data.train": TEXT | NULL,
    "data.val": TEXT | NULL,
    "data.num_workers": at_least(0),
    "input_size": at_least(32),
    "batch_size": at_least(2),  # batch norm needs two images
    "epochs": at_least(1),
    "drop_path_rate": FRACTION,
    "optim.name": Rule("the name of one of timm's optimizers", lambda v: v in list_optimizers()),
    "optim.lr": POSITIVE | NULL,
    "optim.base_lr": POSITIVE,
    "optim.min_lr": NON_NEGATIVE,
    "optim.momentum": FRACTION,
    "optim.clip_grad": POSITIVE | NULL,  # a negative clip would turn every step into gradient ascent
    "optim.weight_decay": NON_NEGATIVE,
    "optim.layer_decay": number("in (0, 1]", lambda v: 0 < v <= 1) | NULL,
    "optim.warmup_epochs": NON_NEGATIVE,
    "aug.scale": numbers(2, "two numbers 0 < min <= max <= 1", lambda v: 0 < v[0] <= v[1] <= 1),
    "aug.crop_pct": number("in (0, 1]", lambda v: 0 < v <= 1),
    "aug.auto_augment": TEXT | NULL,
    "aug.color_jitter": NON_NEGATIVE | NULL,
    "aug.reprob": PROBABILITY,
    "aug.repeats": at_least(1),
    "mixup.prob": PROBABILITY,
    "mixup.mixup_alpha": NON_NEGATIVE,
    "mixup.cutmix_alpha": NON_NEGATIVE,
    "mixup.label_smoothing": FRACTION,
    "ema.warmup": FLAG,
    "ema.decay": OPEN_FRACTION | NULL,
}

# a resumed run must be the same experiment
FIXED_ON_RESUME = ("mode", "model", "pretrained", "data.train", "data.val", "input_size", "batch_size", "epochs",
                   "seed", "optim", "aug", "mixup", "ema", "drop_path_rate", "precision", "tf32")
# ... but a user may resume with these changed on purpose (resume_changes=[...])
CHANGEABLE_ON_RESUME = ("precision", "optim.lr", "optim.base_lr", "optim.min_lr", "optim.clip_grad", "tf32")


def validate(cfg: DictConfig, world_size: int = 1) -> None:
    check_model_and_missing(cfg)
    check_keys(cfg, KEYS, ConfigError)
    if mixing(cfg) and cfg.batch_size % 2:
        raise ConfigError(f"batch_size must be at least 2 (and even with mixup), got {cfg.batch_size}")
    share = cfg.batch_size // world_size  # batch norm needs 2 images a process, mixup pairs them
    if cfg.batch_size % world_size or share < 2 or (mixing(cfg) and share % 2):
        raise ConfigError(f"batch_size {cfg.batch_size} is the global batch and must split evenly among the "
                          f"{world_size} processes into shares of at least 2"
                          + (", even (mixup)" if mixing(cfg) else ""))
    check_input_size(cfg.model, cfg.input_size)
    check_runtime(cfg)


def check_input_size(model: str, size: int) -> None:
    """timm makes some models for one input size (their ``fixed_input_size``: position tables,
    window grids), some for multiples of one (HaloNet's blocks). Such a model runs once at ``size``
    on the meta device (no data, no arithmetic): a size its own checks refuse is refused here in one
    line, before any work."""
    own = timm_input_size(model, size)
    if size == own:
        return
    with torch.device("meta"):
        net = create_timm_model(model, num_classes=0).eval()
    try:
        with torch.no_grad():
            net(torch.empty(1, 3, size, size, device="meta"))
    except NotImplementedError:  # an operator the meta device lacks: no verdict here, the run will tell
        return
    except (AssertionError, RuntimeError, ValueError) as err:
        why = str(err).strip().splitlines()[0][:120] if str(err).strip() else f"{type(err).__name__} in its forward"
        made = (f"timm makes {model} for input_size {own}" if timm.models.get_pretrained_cfg(model).fixed_input_size
                else f"timm runs {model} at multiples of {input_sizes(model).multiple}")  # HaloNet's blocks
        raise ConfigError(f"{made} and it does not run at {size} ({why}); set input_size={own}") from None
