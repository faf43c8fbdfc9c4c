"""Per-model defaults of the official SparK recipes (conf/recipe/spark.yaml) as ``${recipe:KEY}``.

A config interpolates ``${recipe:drop_path_rate}`` and gets the value for its ``model``: the
entry of ``recipe`` whose name is the longest prefix of the model name and sets the key, else
the entry named after the model's timm module (its family).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import timm
from omegaconf import OmegaConf

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


def _resolve(key: str, *, _root_) -> Any:
    return recipe_value(_root_.recipe, _root_.model, key)


def register_resolver() -> None:
    """Make ``${recipe:KEY}`` available to OmegaConf (idempotent)."""
    if not OmegaConf.has_resolver("recipe"):
        OmegaConf.register_new_resolver("recipe", _resolve)


def scaled_lr(base_lr: float, batch_size: int) -> float:
    return base_lr * batch_size / 256
