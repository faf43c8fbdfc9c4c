"""Keeping a run directory sound: one run at a time, a record written only once a run is
accepted, a metrics log repaired before it is appended to, and clean stops on SIGINT/SIGTERM.

A refused command must leave the directory exactly as it found it, so nothing here writes
before the run is accepted: the lock is a flock on the directory itself (no lock file), and the
holder's name, the config record and the metrics repair come after every check has passed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from types import FrameType

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf


class Refused(ValueError):
    """The run cannot start (bad config, busy or unusable run directory); nothing was changed."""


class Stopped(BaseException):
    """SIGINT or SIGTERM stopped the run. A BaseException, like KeyboardInterrupt: a second
    signal may strike anywhere and must not be swallowed by an ``except Exception``."""

    def __init__(self, signame: str, step: int | None = None) -> None:
        super().__init__(signame, step)
        self.signame = signame
        self.step = step  # the step of the checkpoint just written; None: stopped at once

    @property
    def exit_code(self) -> int:
        return 128 + signal.Signals[self.signame].value  # the shell's "killed by signal" code


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


def write_record(run_dir: Path, cfg: DictConfig) -> None:
    """The config record hydra would write (``.hydra/``), written only for an accepted run:
    hydra itself writes it before the app can refuse anything (``hydra.output_subdir: null``)."""
    folder = Path(run_dir) / ".hydra"
    folder.mkdir(exist_ok=True)
    _write_atomically(folder / "config.yaml", OmegaConf.to_yaml(cfg))
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.instance().cfg
        _write_atomically(folder / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.masked_copy(hydra_cfg, ["hydra"])))
        _write_atomically(folder / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task))


def repair_metrics(path: Path, last_step: int) -> str | None:
    """Make metrics.jsonl hold each step up to ``last_step`` (the checkpoint's) exactly once.

    Drops lines that do not parse (a torn tail: the run was killed mid-write), records past the
    checkpoint (those steps are about to run again; for a fresh run, the records of an earlier
    attempt that never checkpointed) and repeated steps (the latest record wins). Returns a
    one-line account of what was dropped, None when the log was already sound.
    """
    if not path.exists():
        return None
    by_step: dict[int, str] = {}
    torn = past = repeated = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
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


class StopSignals:
    """While active, a first SIGINT or SIGTERM only sets ``requested``: the training loop saves
    a checkpoint after the current step and stops. A second one raises ``Stopped`` at once.

    Outside the main thread (where Python cannot install handlers) it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            raise Stopped(name)
        self.requested = name
        print(f"{name}: saving a checkpoint after this step, then stopping "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)
