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

from ..finetune.app import train
from ..run.recipe import CONF_DIR, register_resolver
from ..run.run_dir import RunFiles


def finetune_top1(pretrained: Path | None, model: str, run_dir: Path, overrides: list[str]) -> float:
    """Val top-1 (in %) after the last epoch of fine-tuning ``model`` from ``pretrained`` (a
    pretraining run directory, or None for random initialisation) with ``overrides``."""
    register_resolver()
    resume = RunFiles(run_dir).checkpoint.exists()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("finetune", overrides=[f"model={model}", f"pretrained={pretrained or 'null'}",
                                             *overrides, f"resume={str(resume).lower()}"])
    train(cfg, run_dir)
    records = [json.loads(line) for line in RunFiles(run_dir).metrics.read_text().splitlines() if line.strip()]
    return records[-1]["val_top1"]
