"""Keeping a run directory sound: one run at a time, a record written only once a run is
accepted, a metrics log repaired before it is appended to, and the opening of a directory for a
fresh or resumed run.

A refused command must leave the directory exactly as it found it, so nothing here writes
before the run is accepted: the lock is a flock on the directory itself (no lock file), and the
holder's name, the config record and the metrics repair come after every check has passed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .checkpoint import CheckpointError, load_checkpoint, partial_saves
from .checks import ConfigError, Refused, adopt_former_defaults, check_resumable, get


class RunRules(Protocol):
    """What an app's runs tell their run directory (every training app, ``trainer.App``, has it)."""

    module: str  # its command line, ``python -m <module>``: the line that resumes a stopped run; checkpoints name it
    fixed_on_resume: tuple[str, ...]  # config keys a resumed run may not change (the experiment) ...
    changeable_on_resume: tuple[str, ...]  # ... except these, when named in resume_changes
    former_defaults: Mapping[str, Any]  # keys added since older runs began: the value those behave by
    outputs: tuple[str, ...]  # files it writes atomically into the run directory besides checkpoints


@dataclass(frozen=True)
class RunFiles:
    """Where a run keeps what it writes: one place for the names of a run directory's files."""

    root: Path
    ENCODER = "encoder_timm.pth"  # what a pretraining exports and a fine-tuning reads (a timm state dict)

    @property
    def checkpoint(self) -> Path:
        """Everything a resumed run needs (checkpoint.py), written atomically."""
        return self.root / "checkpoints" / "last.pt"

    @property
    def metrics(self) -> Path:
        """One JSON record per logged step or epoch."""
        return self.root / "metrics.jsonl"

    @property
    def profile(self) -> Path:
        """The profiled steps' traces and summary (``profile.steps``)."""
        return self.root / "profile"

    @property
    def record(self) -> Path:
        """The config record, hydra's ``.hydra/`` folder, written once the run is accepted."""
        return self.root / ".hydra"

    @property
    def config_record(self) -> Path:
        """The composed config in the record, as hydra names it."""
        return self.record / "config.yaml"

    @property
    def encoder(self) -> Path:
        return self.root / self.ENCODER


class RunDirLock:
    """An exclusive lock on a run directory, so two runs never write into it at once.

    flock on the directory's own descriptor: it leaves no file behind for a refused run, and the
    kernel drops it when the holder dies, even by SIGKILL. The holder writes who it is to
    ``.lock_holder`` once accepted (``claim``), so a refused run can name it.
    """

    HOLDER = ".lock_holder"

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.fd: int | None = None
        self.claimed = False

    def acquire(self) -> None:
        fd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                warnings.warn(f"cannot lock {self.run_dir} ({err.strerror}): nothing stops a second "
                              "run from writing into it at the same time", stacklevel=2)
                return
            holder = self.run_dir / self.HOLDER
            who = holder.read_text().strip() if holder.exists() else "another process"
            raise Refused(f"{self.run_dir} is in use by {who}; wait for that run to end "
                          "or choose another hydra.run.dir") from None
        self.fd = fd

    def claim(self) -> None:
        """Name this process as the holder (call once the run is accepted)."""
        if self.fd is None:
            return
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        _write_atomically(self.run_dir / self.HOLDER,
                          f"pid {os.getpid()} on {socket.gethostname()} (since {started})\n")
        self.claimed = True

    def release(self) -> None:
        if self.fd is None:
            return
        if self.claimed:
            (self.run_dir / self.HOLDER).unlink(missing_ok=True)
        # unlock explicitly: forked data-loader workers share the descriptor and may outlive this
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd, self.claimed = None, False


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_record(files: RunFiles) -> dict | None:
    """The run's config as its record holds it, resolved (the caller registers the resolvers it
    interpolates: ``recipe.register_resolver``); None when it is missing or unreadable."""
    try:
        return OmegaConf.to_container(OmegaConf.load(files.config_record), resolve=True)
    except Exception:  # noqa: BLE001 - no record, a damaged one, or one that does not resolve
        return None


def write_record(files: RunFiles, cfg: DictConfig) -> None:
    """The config record hydra would write (``.hydra/``), written only for an accepted run:
    hydra itself writes it before the app can refuse anything (``hydra.output_subdir: null``)."""
    folder = files.record
    folder.mkdir(exist_ok=True)
    _write_atomically(files.config_record, OmegaConf.to_yaml(cfg))
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.instance().cfg
        _write_atomically(folder / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.masked_copy(hydra_cfg, ["hydra"])))
        _write_atomically(folder / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task))


def repair_metrics(path: Path, last_step: int) -> str | None:
    """Make metrics.jsonl hold each step up to ``last_step`` (the checkpoint's) exactly once.

    Drops lines that do not parse (a torn tail: the run was killed mid-write; bytes that are not
    UTF-8, which a torn write or a damaged disk leaves, are torn lines too), records past the
    checkpoint (those steps are about to run again; for a fresh run, the records of an earlier
    attempt that never checkpointed) and repeated steps (the latest record wins). Returns a
    one-line account of what was dropped, None when the log was already sound.
    """
    if not path.exists():
        return None
    by_step: dict[int, str] = {}
    torn = past = repeated = 0
    for raw in path.read_bytes().splitlines():  # decoded line by line: one bad byte spoils one line
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
            step = json.loads(line)["step"]
            if not isinstance(step, int):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            torn += 1
            continue
        if step > last_step:
            past += 1
        else:
            repeated += step in by_step
            by_step[step] = line
    if not torn + past + repeated:
        return None
    _write_atomically(path, "".join(by_step[s] + "\n" for s in sorted(by_step)))
    dropped = [f"{n} {what}" for n, what in ((torn, "torn or unreadable line(s)"),
                                             (past, f"record(s) past step {last_step}"),
                                             (repeated, "repeated step(s)")) if n]
    return f"{path}: dropped {', '.join(dropped)}; kept {len(by_step)} record(s)"


def open_run_dir(cfg: DictConfig, files: RunFiles, lock: RunDirLock, rules: RunRules) -> dict | None:
    """Judge the run directory under its lock and return the checkpoint to resume from (None
    for a fresh run). A refusal writes nothing; an accepted run gets its config record, and the
    leftovers of a killed predecessor (partial saves of the checkpoint and of the app's ``outputs``, a
    torn or repeated metrics log) are mended. A resumed run may not change ``fixed_on_resume``; keys
    its checkpoint predates take their ``former_defaults`` (``adopt_former_defaults``), or else this
    command's values, uncompared; a note names each. A checkpoint another app (``module``) wrote
    is refused (one written before checkpoints named their app is judged by its keys alone)."""
    run_dir, ckpt_path = files.root, files.checkpoint
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file in the way, a read-only mount
        raise Refused(f"{run_dir} cannot be a run directory: {err.strerror}") from None
    lock.acquire()
    try:
        if cfg.get("resume_changes") and not cfg.resume:
            raise ConfigError("resume_changes names keys a resumed run changes; it needs resume=true")
        if cfg.resume and not ckpt_path.exists():
            raise ConfigError(f"resume=true but there is no checkpoint at {ckpt_path}; "
                              "pass the earlier run's directory with hydra.run.dir=...")
        if not cfg.resume and ckpt_path.exists():
            raise ConfigError(f"{run_dir} already holds a checkpoint; pass resume=true to continue "
                              "it or choose another hydra.run.dir")
        ckpt, adopted, unchecked = None, [], []
        if cfg.resume:
            try:
                ckpt = load_checkpoint(ckpt_path)
            except CheckpointError as err:
                raise Refused(f"cannot resume: {err}; start a new run directory") from None
            written_by = ckpt.get("app")
            if written_by not in (None, rules.module):
                raise Refused(f"cannot resume: {ckpt_path} is a checkpoint of python -m {written_by}, not of "
                              f"python -m {rules.module}; choose another hydra.run.dir")
            adopted = adopt_former_defaults(ckpt["config"], cfg, rules.former_defaults)
            unchecked = check_resumable(ckpt["config"], cfg, tuple(rules.fixed_on_resume),
                                        tuple(rules.changeable_on_resume))
    except BaseException:
        lock.release()
        raise
    lock.claim()
    write_record(files, cfg)
    for leftover in [p for path in [ckpt_path, *(run_dir / o for o in rules.outputs)] for p in partial_saves(path)]:
        leftover.unlink()
        print(f"note: removed {leftover}, left by a run killed while saving")
    note = repair_metrics(files.metrics, ckpt["step"] if ckpt else 0)
    if note:
        print(f"note: {note}")
    if ckpt is not None:
        for key in adopted:
            print(f"note: {key}={OmegaConf.select(cfg, key)}, as the checkpoint's run began before the key existed")
        for key in unchecked:
            print(f"note: {key}={OmegaConf.select(cfg, key)} from this command: the checkpoint's run began before "
                  "the key existed, so it was not compared")
        for key in cfg.get("resume_changes") or []:
            print(f"note: resume_changes: {key} {get(ckpt['config'], key)} -> {OmegaConf.select(cfg, key)} "
                  f"from step {ckpt['step']} on (recorded in the checkpoint)")
    return ckpt
