"""What a fine-tuning config must satisfy, checked before any data is read or anything written."""

from __future__ import annotations

from omegaconf import DictConfig

from ..run.checks import ConfigError, check_model_and_missing, check_runtime
from .optim import mixing

# a resumed run must be the same experiment
FIXED_ON_RESUME = ("mode", "model", "pretrained", "data", "input_size", "batch_size", "epochs", "seed",
                   "optim", "aug", "mixup", "ema", "drop_path_rate")


def validate(cfg: DictConfig, world_size: int = 1) -> None:
    check_model_and_missing(cfg)
    if cfg.mode not in ("finetune", "linear"):
        raise ConfigError(f"mode must be finetune or linear, got '{cfg.mode}'")
    if cfg.input_size < 32:
        raise ConfigError(f"input_size must be at least 32, got {cfg.input_size}")
    if cfg.batch_size < 2 or (mixing(cfg) and cfg.batch_size % 2):
        raise ConfigError(f"batch_size must be at least 2 (and even with mixup), got {cfg.batch_size}")
    share = cfg.batch_size // world_size  # batch norm needs 2 images a process, mixup pairs them
    if cfg.batch_size % world_size or share < 2 or (mixing(cfg) and share % 2):
        raise ConfigError(f"batch_size {cfg.batch_size} is the global batch and must split evenly among the "
                          f"{world_size} processes into shares of at least 2"
                          + (", even (mixup)" if mixing(cfg) else ""))
    repeats = cfg.aug.repeats
    if not (isinstance(repeats, int) and not isinstance(repeats, bool) and repeats >= 1):
        raise ConfigError(f"aug.repeats must be a whole number of at least 1, got {repeats}")
    if not (isinstance(cfg.epochs, int) and cfg.epochs >= 1):
        raise ConfigError(f"epochs must be a positive whole number, got {cfg.epochs}")
    if cfg.ema.decay is not None and not 0.0 < cfg.ema.decay < 1.0:
        raise ConfigError(f"ema.decay must be in (0, 1) or null, got {cfg.ema.decay}")
    if cfg.optim.layer_decay is not None and not 0.0 < cfg.optim.layer_decay <= 1.0:
        raise ConfigError(f"optim.layer_decay must be in (0, 1] or null, got {cfg.optim.layer_decay}")
    check_runtime(cfg)
