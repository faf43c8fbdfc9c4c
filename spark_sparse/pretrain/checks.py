"""What a pretraining config must satisfy, checked before any data is read or anything written."""

from __future__ import annotations

from omegaconf import DictConfig

from ..encoders.registry import engine_class
from ..run.checks import ConfigError, check_model_and_missing, check_runtime

# a resumed run must be the same experiment; these may not change between the two halves
FIXED_ON_RESUME = ("model", "engine", "mask_ratio", "input_size", "batch_size", "seed",
                   "decoder", "drop_path_rate", "optim", "max_steps", "epochs")


def hidden_patches(input_size: int, mask_ratio: float, stride: int = 32) -> int:
    """How many patches of each image the mask hides (what spark_sparse.mask.random_active keeps)."""
    patches = (input_size // stride) ** 2
    return patches - max(1, round(patches * (1.0 - mask_ratio)))


def validate(cfg: DictConfig, world_size: int = 1) -> None:
    check_model_and_missing(cfg)
    try:
        engine_class(cfg.engine)  # imported now: a sparse engine without MinkowskiEngine stops before any work
    except (ValueError, ImportError) as err:
        raise ConfigError(str(err)) from None
    if not 0.0 <= cfg.mask_ratio < 1.0:
        raise ConfigError(f"mask_ratio must be in [0, 1), got {cfg.mask_ratio}")
    if cfg.input_size <= 0 or cfg.input_size % 32:
        raise ConfigError(f"input_size must be a positive multiple of 32, got {cfg.input_size}")
    if hidden_patches(cfg.input_size, cfg.mask_ratio) == 0:
        raise ConfigError(f"mask_ratio {cfg.mask_ratio} at input_size {cfg.input_size} hides none of the "
                          f"{(cfg.input_size // 32) ** 2} patch(es) of an image: with nothing to "
                          "reconstruct the loss is always 0; raise mask_ratio or input_size")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {cfg.batch_size}")
    if cfg.batch_size % world_size:
        raise ConfigError(f"batch_size {cfg.batch_size} is the global batch and must divide evenly "
                          f"among the {world_size} processes")
    if cfg.epochs is None and (cfg.max_steps is None or cfg.max_steps < 1):
        raise ConfigError("set max_steps (a positive number of steps) or epochs")
    if cfg.epochs is not None and not cfg.epochs > 0:
        raise ConfigError(f"epochs must be positive (or null to use max_steps), got {cfg.epochs}")
    for key in ("log_every", "save_every", "vis_every", "vis_images"):
        if cfg[key] < 1:
            raise ConfigError(f"{key} must be at least 1, got {cfg[key]}")
    check_runtime(cfg)
