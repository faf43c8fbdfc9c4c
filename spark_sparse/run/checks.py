"""What every training app's config must satisfy, checked before any data is read or anything written:
the model, unset keys, the runtime (threads, devices, logger), and a resume that keeps the experiment."""

from __future__ import annotations

import difflib
import netrc
import os

import timm
import torch
from omegaconf import DictConfig, OmegaConf

from ..encoders.families import FAMILIES

# the timm modules whose models spark_sparse.encoders converts (refusals name the module and path)
TIMM_MODULES = [family.name for family in FAMILIES]


class Refused(ValueError):
    """The run cannot start (bad config, busy or unusable run directory); nothing was changed."""


class ConfigError(Refused):
    """The configuration cannot work; raised before any data is read or model built."""


def _wandb_key_present() -> bool:
    """Whether wandb can log in without asking: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = (os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").split("//")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host.split(":")[0]) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def timm_module_of(model: str) -> str | None:
    """The timm module that defines ``model`` (``resnet`` for ``resnet50``), None for a name timm
    does not know."""
    if not timm.is_model(model):
        return None
    return next((m for m in timm.list_modules() if timm.models.is_model_in_modules(model, [m])), None)


def check_model_and_missing(cfg: DictConfig) -> None:
    """The model first (the other keys' defaults come from its recipe), then unset keys."""
    model, module = str(cfg.model), timm_module_of(str(cfg.model))
    if module is None:
        close = difflib.get_close_matches(model, timm.list_models(module=TIMM_MODULES), n=3)
        raise ConfigError(f"unknown model '{model}': expected a timm model of {', '.join(TIMM_MODULES)}"
                          + (f" (did you mean {', '.join(close)}?)" if close else ""))
    if module not in TIMM_MODULES:
        raise ConfigError(f"model '{model}' is timm's (timm.models.{module}), a family spark_sparse does not "
                          f"convert; supported: the models of {', '.join(TIMM_MODULES)} (README: Families)")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        example = " ".join(f"{k}=..." for k in missing)
        raise ConfigError(f"{', '.join(missing)} must be set (add {example} to the command line)")


def check_runtime(cfg: DictConfig) -> None:
    """Threads, distributed timeout, logger and device: what every training app shares."""
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"threads must be at least 1 (or null for PyTorch's default), got {cfg.threads}")
    if not cfg.dist_timeout_s > 0:
        raise ConfigError(f"dist_timeout_s must be positive, got {cfg.dist_timeout_s}")
    if cfg.logger.kind == "wandb" and cfg.logger.mode == "online" and not _wandb_key_present():
        raise ConfigError("logger.mode=online needs a wandb API key (run `wandb login` or set "
                          "WANDB_API_KEY); logger.mode=offline logs without one")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is available; use device=cpu")
    if cfg.device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu or cuda, got '{cfg.device}'")


def check_resumable(saved: dict, cfg: DictConfig, fixed: tuple[str, ...]) -> None:
    """Refuse to resume a run whose ``fixed`` keys differ from the checkpoint's config."""
    now = OmegaConf.to_container(cfg, resolve=True)
    changed = [k for k in fixed if saved.get(k) != now.get(k)]
    if changed:
        raise ConfigError(f"resume=true with a different {', '.join(changed)} than the checkpoint's; "
                          "start a new run directory instead")
