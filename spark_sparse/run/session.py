"""The run layer shared by the training apps (pretraining, fine-tuning): opening a run directory
for a fresh or resumed run, saving with a one-line account of what was kept, and the hydra entry
point's handling of stops and errors. Each app keeps only its recipe: model, data, loop.
"""

from __future__ import annotations

import errno
import random
import shlex
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from . import distributed
from .checks import ConfigError, check_resumable
from .checkpoint import CheckpointError, atomic_save, load_checkpoint, partial_saves, set_rng_state
from ..data.seeds import derive_seed
from .run_dir import Refused, RunDirLock, Stopped, repair_metrics, write_record


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class RunFailed(RuntimeError):
    """The run stopped for a reason outside its config (disk full, out of memory); the message
    says what was kept."""


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def restore_rng(ckpt: dict, mask_generator: torch.Generator | None, seed: int, rank: int) -> None:
    """This rank's saved RNG states; a rank the checkpoint has none for (it was written by fewer
    processes) takes rank 0's mask generator and fresh per-rank global RNGs."""
    states = ckpt.get("rng_per_rank") or [ckpt["rng"]]
    if rank < len(states):
        set_rng_state(states[rank], mask_generator)
    else:
        set_rng_state(states[0], mask_generator)
        seed_everything(derive_seed("resume", seed, rank, ckpt["step"]))


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (PyTorch's CPU allocator raises a RuntimeError)."""
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    signs = ("DefaultCPUAllocator", "can't allocate memory", "not enough memory", "bad_alloc")
    return isinstance(err, RuntimeError) and any(sign in str(err) for sign in signs)


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err``, or an error it arose from, is a full disk or an exceeded quota: torch.save
    reports a failed write as a RuntimeError of its archive writer, with the OSError as context."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    return False


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def out_of_memory(err: BaseException, cfg: DictConfig, kept: str, processes: int = 1) -> RunFailed:
    """The one-line account of an allocation failure: the size asked for and what was kept."""
    return RunFailed(f"out of memory at input_size={cfg.input_size}, batch_size={cfg.batch_size} "
                     f"({cfg.model}, {processes} process(es)): {first_line(err)}; a smaller "
                     f"input_size or batch_size needs less; {kept}")


def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / "last.pt"


def open_run_dir(cfg: DictConfig, run_dir: Path, lock: RunDirLock, fixed_on_resume: Iterable[str],
                 outputs: Iterable[str] = ()) -> dict | None:
    """Judge the run directory under its lock and return the checkpoint to resume from (None
    for a fresh run). A refusal writes nothing; an accepted run gets its config record, and the
    leftovers of a killed predecessor (partial saves of the checkpoint and of ``outputs``, a torn
    or repeated metrics log) are mended. A resumed run may not change ``fixed_on_resume``."""
    ckpt_path = checkpoint_path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    try:
        if cfg.resume and not ckpt_path.exists():
            raise ConfigError(f"resume=true but there is no checkpoint at {ckpt_path}; "
                              "pass the earlier run's directory with hydra.run.dir=...")
        if not cfg.resume and ckpt_path.exists():
            raise ConfigError(f"{run_dir} already holds a checkpoint; pass resume=true to continue "
                              "it or choose another hydra.run.dir")
        ckpt = None
        if cfg.resume:
            try:
                ckpt = load_checkpoint(ckpt_path)
            except CheckpointError as err:
                raise Refused(f"cannot resume: {err}; start a new run directory") from None
            check_resumable(ckpt["config"], cfg, tuple(fixed_on_resume))
    except BaseException:
        lock.release()
        raise
    lock.claim()
    write_record(run_dir, cfg)
    for leftover in [p for name in ["checkpoints/last.pt", *outputs] for p in partial_saves(run_dir / name)]:
        leftover.unlink()
        print(f"note: removed {leftover}, left by a run killed while saving")
    note = repair_metrics(run_dir / "metrics.jsonl", ckpt["step"] if ckpt else 0)
    if note:
        print(f"note: {note}")
    return ckpt


class Saver:
    """Atomic saves that turn a full disk into a RunFailed naming the last good checkpoint.

    ``save`` is the low-level writer (atomic_save; injectable, so a test can kill a run mid-save).
    """

    def __init__(self, run_dir: Path, last_saved: int | None,
                 save: Callable[[Any, Path], Any] = atomic_save) -> None:
        self.ckpt_path = checkpoint_path(run_dir)
        self.last_saved = last_saved  # the step of the newest checkpoint on disk; None: none yet
        self._save = save

    def kept(self) -> str:
        return (f"the last good checkpoint is {self.ckpt_path} (step {self.last_saved})"
                if self.last_saved is not None else "no checkpoint was written")

    def write(self, obj: object, path: Path, what: str) -> None:
        try:
            self._save(obj, path)
        except (OSError, RuntimeError) as err:
            if not is_disk_full(err):
                raise
            raise RunFailed(f"disk full while saving {what}: {self.kept()}; free some space and "
                            "continue with resume=true") from None

    def checkpoint(self, ckpt: dict, step: int) -> None:
        self.write(ckpt, self.ckpt_path, f"the step-{step} checkpoint")
        self.last_saved = step


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
            elif checkpoint_path(run_dir).exists():
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
