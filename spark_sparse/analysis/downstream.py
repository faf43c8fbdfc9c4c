"""Downstream accuracy for a sweep report: each run's encoder fine-tuned (or linearly evaluated) by
``spark_sparse.finetune``, beside the same recipe from random initialisation.

Each evaluation is an ordinary fine-tuning run directory: ``<run>/finetune/`` for a pretraining run,
``<sweep>/finetune_random_init/<model>/`` for the baseline (one per model). A directory that already
holds a checkpoint is resumed, so a finished evaluation is read back rather than run again and an
interrupted one continues.
"""

from __future__ import annotations

import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig

from ..finetune.app import train
from ..finetune.checks import validate
from ..run.failures import first_line
from ..run.recipe import CONF_DIR, register_resolver
from ..run.run_dir import RunFiles
from .cli import CommandError

SET_HERE = ("model", "pretrained", "resume", "hydra")  # what the report chooses for every evaluation


def finetune_config(pretrained: Path | None, model: str, overrides: list[str], resume: bool = False) -> DictConfig:
    register_resolver()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("finetune", overrides=[f"model={model}", f"pretrained={pretrained or 'null'}",
                                              *overrides, f"resume={str(resume).lower()}"])


def check_overrides(overrides: list[str], models: set[str]) -> None:
    """Refuse, before any run is evaluated, overrides that fine-tuning would refuse for every run
    (a key it does not have, a value it rejects) or that would change what the report sets."""
    taken = [o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] in SET_HERE]
    if taken:
        raise CommandError(f"--finetune {' '.join(taken)}: the report sets {', '.join(SET_HERE[:3])} and the "
                           "run directories of its evaluations itself")
    for model in sorted(models):
        try:
            validate(finetune_config(None, model, overrides))
        except (HydraException, ValueError) as err:
            raise CommandError(f"--finetune {' '.join(overrides)}: {first_line(err)}") from None


def finetune_top1(pretrained: Path | None, model: str, run_dir: Path, overrides: list[str]) -> float:
    """Val top-1 (in %) after the last epoch of fine-tuning ``model`` from ``pretrained`` (a
    pretraining run directory, or None for random initialisation) with ``overrides``."""
    resume = RunFiles(run_dir).checkpoint.exists()
    train(finetune_config(pretrained, model, overrides, resume), run_dir)
    records = [json.loads(line) for line in RunFiles(run_dir).metrics.read_text().splitlines() if line.strip()]
    return records[-1]["val_top1"]
