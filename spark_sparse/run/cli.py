"""The command line around a training app: a stop explained with the command that resumes it,
refusals and failures as one line on stderr with a non-zero exit code, a refused command leaving
no run directory behind."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from . import distributed
from .checks import Refused
from .failures import RunFailed, TrainingDiverged, first_line
from .run_dir import RunFiles
from .signals import Stopped


def resume_command(module: str, run_dir: Path, distributed_run: bool) -> str:
    """The command line that continues ``run_dir``: this one, with resume=true and its directory."""
    if distributed_run:
        return f"the same torchrun command with resume=true hydra.run.dir={run_dir}"
    keep = [o for o in HydraConfig.get().overrides.task if not o.startswith(("resume=", "hydra.run.dir="))]
    return shlex.join(["python", "-m", module, *keep, "resume=true", f"hydra.run.dir={run_dir}"])


def run_app(cfg: DictConfig, module: str, train: Callable[[DictConfig, Path], dict]) -> dict | None:
    """What a hydra entry point does around ``train(cfg, run_dir)``: stops explained with the
    command that resumes, refusals and failures as one line on stderr (exit 1; in a multirun only
    that job fails), a refused command leaving no run directory behind. Returns the summary on
    rank 0, None on the other ranks."""
    # under torchrun the SharedRunDir callback has joined the process group and given every rank
    # rank 0's run directory
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    ctx = distributed.init_from_env(cfg.get("dist_timeout_s"))
    prefix = f"rank {ctx.rank}: " if ctx.distributed else ""
    try:
        summary = train(cfg, run_dir)
    except Stopped as stop:
        if ctx.is_main:
            how = resume_command(module, run_dir, ctx.distributed)
            if stop.step is not None:
                print(f"stopped by {stop.signame} at step {stop.step}, checkpoint saved; continue with: {how}",
                      file=sys.stderr)
            elif RunFiles(run_dir).checkpoint.exists():
                print(f"stopped at once by a second {stop.signame}; the last checkpoint is kept, "
                      f"continue with: {how}", file=sys.stderr)
            else:
                print(f"stopped at once by a second {stop.signame}, before any checkpoint", file=sys.stderr)
        raise SystemExit(stop.exit_code) from None
    except (Refused, TrainingDiverged, RunFailed, FileNotFoundError, ValueError) as err:
        # refusals and divergence strike every rank alike: rank 0 speaks for all
        if ctx.is_main or not isinstance(err, (Refused, TrainingDiverged)):
            print(f"{prefix}error: {err}", file=sys.stderr)
        if ctx.is_main and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # hydra made it for a command refused before any write: leave no trace
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # an ordinary exception fails this job only: the sweep's other settings still run
            raise RuntimeError(f"run {run_dir} failed: {err}") from None
        raise SystemExit(1) from None
    except RuntimeError as err:
        if not (ctx.distributed and distributed.is_timeout(err)):
            raise
        print(f"{prefix}error: another rank did not answer within dist_timeout_s={cfg.dist_timeout_s} "
              f"(frozen or dead?); the last checkpoint is kept ({first_line(err)})", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        distributed.shutdown()
    return summary if ctx.is_main else None
