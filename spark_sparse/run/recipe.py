"""Per-model defaults: the official SparK recipes (conf/recipe/spark.yaml) as ``${recipe:KEY}``,
and input sizes the model runs at.

A config interpolates ``${recipe:drop_path_rate}`` and gets the value for its ``model``: the
entry of ``recipe`` whose name is the longest prefix of the model name and sets the key, else
the entry named after the model's timm module (its family). ``${encoder_input_size:128}`` is 128
or the least size up from it the model's encoders run at (Hiera: its own 224);
``${timm_input_size:64}`` is the model's own size where timm fixes it, else 64 or the least size up
from it the encoders run at. ``${encoder_scales:}`` is how many scales the model's encoders output.
One default is the machine's, not the model's: ``${cpu_workers:4}`` is 4 data-loading workers, or
fewer where this process may use fewer cores.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import timm
from omegaconf import OmegaConf

from ..encoders.families import encoder_strides, input_sizes
from ..encoders.layouts import STRIDES
from ..encoders.refusals import ConversionError

# absolute: run as `python -m spark_sparse.pretrain`, hydra would resolve a relative path against
# that entry module's package
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
RECIPE_FILE = Path(CONF_DIR) / "recipe" / "spark.yaml"


def recipe_value(recipes: Mapping, model: str, key: str) -> Any:
    """Entries named by a prefix of the model name, longest first, then the entry of the model's
    timm module (its family: ``resnet`` also holds resnext, seresnet, ...)."""
    names = sorted((n for n in recipes if model.startswith(n)), key=len, reverse=True)
    names += [n for n in recipes if n not in names and timm.is_model(model)
              and timm.models.is_model_in_modules(model, [n])]
    for name in names:
        if key in recipes[name]:
            return recipes[name][key]
    raise KeyError(f"the SparK recipe has no '{key}' for model '{model}'; set {key} explicitly")


def default_recipe(model: str, key: str) -> Any:
    """The shipped recipe's value, for tools without a pretraining config (benchmarks)."""
    return recipe_value(OmegaConf.load(RECIPE_FILE), model, key)


def encoder_input_size(model: str, default: int) -> int:
    """``default``, or the least size up from it the encoders of ``model`` run at; ``default``
    for a model they do not convert (the config check names that)."""
    try:
        return input_sizes(model).fit(default)
    except ConversionError:
        return default


def encoder_scales(model: str) -> int:
    """How many scales the encoders of ``model`` output (4 for most families; Visformer's 3); 4 for a
    model they do not convert (the config check names that)."""
    try:
        return len(encoder_strides(model))
    except ConversionError:
        return len(STRIDES)


def timm_input_size(model: str, default: int) -> int:
    """The model's own input size where timm fixes it (Swin, Hiera, MaxViT, ...: their
    ``pretrained_cfg``'s ``fixed_input_size``), else ``default`` or the least size up from it its
    encoders run at (HaloNet's whole blocks of attention, which timm's forward asserts too)."""
    cfg = timm.models.get_pretrained_cfg(model) if timm.is_model(model) else None
    return cfg.input_size[-1] if cfg is not None and cfg.fixed_input_size else encoder_input_size(model, default)


def cpu_workers(default: int) -> int:
    """``default`` data-loading workers, at most one per core this process may run on: more only
    fight over the cores (the DataLoader warns of it)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(default, cores)


def _resolve(key: str, *, _root_) -> Any:
    return recipe_value(_root_.recipe, _root_.model, key)


RESOLVERS = {"recipe": _resolve,
             "encoder_input_size": lambda default, *, _root_: encoder_input_size(_root_.model, default),
             "encoder_scales": lambda *, _root_: encoder_scales(_root_.model),
             "timm_input_size": lambda default, *, _root_: timm_input_size(_root_.model, default),
             "cpu_workers": cpu_workers}


def register_resolver() -> None:
    """Make ``${recipe:KEY}``, the input-size defaults and ``${cpu_workers:N}`` available to OmegaConf
    (idempotent)."""
    for name, resolver in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def scaled_lr(base_lr: float, batch_size: int) -> float:
    return base_lr * batch_size / 256
