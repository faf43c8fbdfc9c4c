"""Where a run's numbers go: metrics.jsonl always, wandb when logger=wandb (rank 0 only)."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from .run_dir import RunFiles


class RunLogger:
    def __init__(self, files: RunFiles, cfg: Any, config: dict, resume_step: int | None = None):
        run_dir = files.root
        self.path = files.metrics  # repaired by run_dir.repair_metrics before a run appends
        self.file = open(self.path, "a")
        self.wandb = None
        if cfg.kind == "wandb":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, mode=cfg.mode,
                                    tags=list(cfg.tags), dir=str(run_dir), config=config,
                                    resume="allow" if resume_step is not None else None,
                                    id=_wandb_id(run_dir))
        elif cfg.kind != "none":
            raise ValueError(f"logger must be 'none' or 'wandb', got '{cfg.kind}'")

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def log_image(self, path: Path, step: int) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({"reconstruction": wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


class NullLogger:
    """What the other ranks of a distributed run log: nothing (rank 0 logs the global numbers)."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def log_image(self, path: Path, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def _wandb_id(run_dir: Path) -> str:
    """One wandb run per run directory, so a resumed run continues the same wandb run."""
    id_file = run_dir / "wandb_id.txt"
    if not id_file.exists():
        id_file.write_text(secrets.token_hex(4))
    return id_file.read_text().strip()
