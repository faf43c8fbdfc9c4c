"""The command line around a training app: a stop explained with the command that resumes it,
refusals and failures as one line on stderr with a non-zero exit code, and a run directory left as
the command found it (hydra makes it before the app can refuse anything: ``RunDirCallback``
checks it first and notes whether it was there)."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict, read_write

from . import distributed
from .checks import Refused
from .failures import RunFailed, TrainingDiverged, first_line
from .overrides import override_error
from .recipe import CONF_DIR, register_resolver
from .run_dir import RunFiles
from .signals import Stopped


# set by RunDirCallback for the app's process: "1" when hydra.run.dir existed before this command
RUN_DIR_EXISTED = "SPARK_SPARSE_RUN_DIR_EXISTED"


def unusable(run_dir: Path) -> str | None:
    """Why ``run_dir`` cannot become a run directory (a file in its way, a folder this process may
    not write into), None when it can."""
    path = run_dir.absolute()
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        return f"{path} is a file, not a folder"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"cannot write into {path} (read-only or no permission)"
    return None


class RunDirCallback(Callback):
    """Hydra callback run before hydra makes the run directory: it refuses, in one line, a
    directory that cannot be one, notes whether it existed (a refused command then leaves it as it
    was: hydra's new folder removed, the user's kept), makes it, and under torchrun gives every
    process rank 0's directory (``${now:...}`` can tick between processes, even between machines)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        ctx = distributed.init_from_env(config.get("dist_timeout_s"))
        # '~/runs/a' (quoted: hydra's grammar refuses a bare ~) is the home folder's, as data.root's
        # is, not a folder named ~ in the working directory
        run_dir = os.path.expanduser(str(config.hydra.run.dir))
        if ctx.distributed:
            run_dir = distributed.broadcast_from_main(run_dir if ctx.is_main else None)
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.run.dir = run_dir
        # hydra turns an exception raised here into a warning and then fails making the directory
        # with a traceback: whatever the checks cannot foresee (a name too long, a pseudo file
        # system) is caught here
        try:
            why = unusable(Path(run_dir))
            os.environ[RUN_DIR_EXISTED] = "1" if Path(run_dir).exists() else "0"
            if why is None:
                Path(run_dir).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            why = err.strerror or type(err).__name__
        if why is not None:
            if ctx.is_main:
                print(f"error: hydra.run.dir={run_dir} cannot be a run directory: {why}", file=sys.stderr)
            raise SystemExit(1)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # each job composes its own hydra.sweep.dir again from the command line: no expanding it here
        sweep_dir = str(config.hydra.sweep.dir)
        if sweep_dir.startswith("~"):
            print(f"error: hydra.sweep.dir={sweep_dir} would be a folder named ~ in the working directory "
                  f"(a sweep's jobs do not expand it); write it in full: {os.path.expanduser(sweep_dir)}",
                  file=sys.stderr)
            raise SystemExit(1)


def _leave_as_found(run_dir: Path, ctx: distributed.Context) -> None:
    """Remove the run directory hydra made for a command that ended before writing anything into
    it (in a sweep it makes every job's); a directory that was there before is left alone."""
    made = HydraConfig.get().mode == RunMode.MULTIRUN or os.environ.get(RUN_DIR_EXISTED) == "0"
    if ctx.is_main and made and run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()


def command_line(main: Callable[[], Any], config_name: str, config_dir: str = CONF_DIR) -> None:
    """Run an app's hydra ``main`` (its config ``config_name`` in ``config_dir``): the recipe
    resolver first (``--cfg job --resolve`` resolves too), overrides hydra cannot compose refused in
    one line, and a Ctrl-C before the run has installed its stop signals ends quietly (exit 130)."""
    register_resolver()
    try:
        why = override_error(config_dir, config_name, sys.argv[1:])
        if why is not None:
            print(f"error: {why}", file=sys.stderr)
            raise SystemExit(1)
        main()
    except KeyboardInterrupt:
        print("stopped by SIGINT", file=sys.stderr)
        raise SystemExit(130) from None


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
    # under torchrun the RunDirCallback has joined the process group and given every rank rank 0's
    # run directory
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    ctx = distributed.init_from_env(cfg.get("dist_timeout_s"))
    prefix = f"rank {ctx.rank}: " if ctx.distributed else ""
    try:
        summary = train(cfg, run_dir)
    except KeyboardInterrupt:  # before the run installed its stop signals: nothing was written
        print("stopped by SIGINT before the run started", file=sys.stderr)
        _leave_as_found(run_dir, ctx)
        raise SystemExit(130) from None
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
        _leave_as_found(run_dir, ctx)
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
