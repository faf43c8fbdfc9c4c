"""What every training app's config must satisfy, checked before any data is read or anything written:
the model, unset keys, the runtime (threads, devices, logger), and a resume that keeps the experiment."""

from __future__ import annotations

import copy
import difflib
import netrc
import os
from collections.abc import Mapping
from typing import Any

import timm
import torch
from omegaconf import DictConfig, OmegaConf

from ..encoders.families import FAMILIES
from ..precision import PRECISIONS, check_precision
from .schema import ANY_TABLE, FLAG, NULL, POSITIVE, TEXT, TEXTS, Rule, at_least, one_of

# the timm modules whose models spark_sparse.encoders converts (refusals name the module and path)
TIMM_MODULES = [module for family in FAMILIES for module in family.timm_modules]


# the keys every training app has (conf/logger/*.yaml among them); each app adds its own
RUN_KEYS: dict[str, Rule] = {
    "model": TEXT,
    "seed": at_least(0),
    "resume": FLAG,
    "resume_changes": TEXTS,  # which may change: the app's changeable_on_resume (check_resumable)
    "device": one_of("cpu", "cuda"),
    "precision": one_of(*PRECISIONS),
    "tf32": FLAG,
    "threads": at_least(1) | NULL,
    "dist_timeout_s": POSITIVE,
    "profile.start": at_least(1),
    "profile.steps": at_least(0),
    "logger.kind": one_of("none", "wandb"),
    "logger.project": TEXT,
    "logger.entity": TEXT | NULL,
    "logger.name": TEXT | NULL,
    "logger.mode": one_of("online", "offline", "disabled"),
    "logger.init_timeout": POSITIVE,
    "logger.tags": TEXTS,
    "recipe": ANY_TABLE,  # the per-model recipe tables, read through ${recipe:KEY}
}


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
    """What the keys' rules cannot say about the runtime: the logger's key, the device's presence."""
    if cfg.logger.kind == "wandb" and cfg.logger.mode == "online" and not _wandb_key_present():
        raise ConfigError("logger.mode=online needs a wandb API key (run `wandb login` or set "
                          "WANDB_API_KEY); logger.mode=offline logs without one")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is available; use device=cpu")
    try:
        check_precision(cfg.precision, cfg.device)
    except ValueError as err:
        raise ConfigError(str(err)) from None


ABSENT = object()  # what ``get`` finds where a config has no such key


def get(config: dict, key: str, absent: object = None):
    """The value at a dotted key of a plain config dict (``absent`` where it has none)."""
    for part in key.split("."):
        if not (isinstance(config, dict) and part in config):
            return absent
        config = config[part]
    return config


def _without(config: dict, keys: list[str]) -> dict:
    """A copy of a plain config dict without the dotted ``keys``."""
    config = copy.deepcopy(config)
    for key in keys:
        *parents, last = key.split(".")
        node = config
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    return config


def adopt_former_defaults(saved: dict, cfg: DictConfig, former: Mapping[str, Any]) -> list[str]:
    """A resumed run goes on as it began: each key of ``former`` (added to the config since, with
    the value the code before it behaved by) that the checkpoint's config ``saved`` lacks takes
    that value, in ``saved`` and in ``cfg``. Returns those keys."""
    adopted = [key for key in former if get(saved, key, ABSENT) is ABSENT]
    for key in adopted:
        *parents, last = key.split(".")
        node = saved
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = former[key]
        OmegaConf.update(cfg, key, former[key], merge=False)
    return adopted


def check_resumable(saved: dict, cfg: DictConfig, fixed: tuple[str, ...],
                    changeable: tuple[str, ...] = ()) -> list[str]:
    """Refuse to resume a run whose ``fixed`` keys (dotted for one key of a group) differ from the
    checkpoint's config, but for the ``changeable`` ones the user names in ``resume_changes``: a
    deliberate change (a smaller lr after a divergence), recorded in the checkpoint. Returns the
    fixed keys the checkpoint's config lacks (its code had none): those were not compared."""
    now = OmegaConf.to_container(cfg, resolve=True)
    changes = list(now.get("resume_changes") or [])
    refused = [k for k in changes if k not in changeable]
    if refused:
        raise ConfigError(f"resume_changes may name {', '.join(changeable) or 'nothing'}, not {', '.join(refused)}")
    saved, now = _without(saved, changes), _without(now, changes)
    # a key the checkpoint's code did not have yet is not compared (a key whose former behaviour
    # differs from today's default is the app's former_defaults)
    unchecked = [k for k in fixed if get(saved, k, ABSENT) is ABSENT]
    changed = [k for k in fixed if k not in unchecked and get(saved, k) != get(now, k)]
    if changed:
        allowed = f", or name it in resume_changes=[...] ({', '.join(changeable)} may change)" if changeable else ""
        raise ConfigError(f"resume=true with a different {', '.join(changed)} than the checkpoint's; "
                          f"start a new run directory instead{allowed}")
    return unchecked
