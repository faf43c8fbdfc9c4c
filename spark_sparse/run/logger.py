"""Where a run's numbers go: metrics.jsonl always, wandb when logger=wandb (rank 0 only).

wandb online that cannot reach its server within ``logger.init_timeout`` seconds (no network, a
firewall, a bad key) logs offline instead, with a one-line warning: the run, perhaps hours in a
scheduler's queue, is worth more than its live dashboard, and an offline run loses nothing (``wandb
sync`` uploads it later). Any other wandb failure stops the run in one line before its first step.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from .failures import RunFailed, first_line
from .run_dir import RunFiles


class RunLogger:
    def __init__(self, files: RunFiles, cfg: Any, config: dict, resume_step: int | None = None):
        run_dir = files.root
        self.path = files.metrics  # repaired by run_dir.repair_metrics before a run appends
        self.file = open(self.path, "a")
        self.wandb = None
        if cfg.kind == "wandb":
            self.wandb = _start_wandb(cfg, run_dir, config, resumed=resume_step is not None)
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


def _start_wandb(cfg: Any, run_dir: Path, config: dict, resumed: bool):
    """The wandb run of ``run_dir``: online as asked, else (no answer within cfg.init_timeout
    seconds, or a refused login) offline with a one-line warning."""
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    options = dict(project=cfg.project, entity=cfg.entity, name=cfg.name, tags=list(cfg.tags), dir=str(run_dir),
                   config=config, resume="allow" if resumed else None, id=_wandb_id(run_dir))
    try:
        try:
            return wandb.init(mode=cfg.mode, settings=wandb.Settings(init_timeout=cfg.init_timeout), **options)
        except wandb.errors.CommError as err:
            if cfg.mode != "online":
                raise
            print(f"warning: wandb online failed ({first_line(err)}); logging offline to {run_dir}/wandb "
                  f"instead, upload it later with `wandb sync {run_dir}/wandb/offline-run-*`",
                  file=sys.stderr, flush=True)
            wandb.teardown()  # the failed attempt still holds the run's id
            return wandb.init(mode="offline", **options)
    except wandb.errors.Error as err:
        raise RunFailed(f"wandb could not start ({type(err).__name__}: {first_line(err)}); "
                        "logger=none runs without it") from None


def _wandb_id(run_dir: Path) -> str:
    """One wandb run per run directory, so a resumed run continues the same wandb run."""
    id_file = run_dir / "wandb_id.txt"
    if not id_file.exists():
        id_file.write_text(secrets.token_hex(4))
    return id_file.read_text().strip()
