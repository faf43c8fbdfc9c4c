"""Checkpoints that survive a crash (written to a temporary file, then atomically renamed), and the
saver that turns a full disk into one line naming the last good checkpoint."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from .failures import RunFailed, is_disk_full


# what a spark_sparse training checkpoint holds at least
CHECKPOINT_KEYS = frozenset({"model", "optimizer", "scheduler", "step", "config"})


class CheckpointError(ValueError):
    """A file that cannot be read as a training checkpoint (empty, truncated, or something else)."""


_UMASK_LOCK = threading.Lock()  # reading the umask without /proc sets it for a moment


def creation_mode() -> int:
    """The mode ``open`` gives a new file, 0o666 less the umask (tempfile.mkstemp makes 0o600:
    a checkpoint on a shared cluster directory would be unreadable to the group)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        umask = os.umask(0o077)
        os.umask(umask)
    return 0o666 & ~umask


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to ``path`` so that a reader (or a crash) never sees a half-written file; the
    file gets the mode any new file gets (the umask's), not mkstemp's private 0o600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, creation_mode())
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def partial_saves(path: str | Path) -> list[Path]:
    """Temporary files atomic_save left for ``path`` when it was killed mid-write."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint written by pretraining; CheckpointError (one line) for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        # our own file, with numpy RNG state and config inside: not a weights-only payload
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - torch.load fails in many ways on a damaged file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else "no detail"
        size = path.stat().st_size
        raise CheckpointError(f"{path} ({size} bytes) is not a readable checkpoint, perhaps empty or "
                              f"truncated ({type(err).__name__}: {reason})") from None
    if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= ckpt.keys():
        raise CheckpointError(f"{path} is not a training checkpoint (it lacks "
                              f"{', '.join(sorted(CHECKPOINT_KEYS - set(ckpt) if isinstance(ckpt, dict) else CHECKPOINT_KEYS))})")
    return ckpt


class Saver:
    """Atomic saves that turn a full disk into a RunFailed naming the last good checkpoint."""

    def __init__(self, ckpt_path: Path, last_saved: int | None) -> None:
        self.ckpt_path = ckpt_path
        self.last_saved = last_saved  # the step of the newest checkpoint on disk; None: none yet

    def kept(self) -> str:
        return (f"the last good checkpoint is {self.ckpt_path} (step {self.last_saved})"
                if self.last_saved is not None else "no checkpoint was written")

    def then(self) -> str:
        """How to go on once space is freed: resume, or (with nothing saved) start again."""
        return "continue with resume=true" if self.last_saved is not None else "run the same command again"

    def write(self, obj: object, path: Path, what: str) -> None:
        try:
            atomic_save(obj, path)
        except (OSError, RuntimeError) as err:
            if not is_disk_full(err):
                raise
            raise RunFailed(f"disk full while saving {what}: {self.kept()}; free some space and "
                            f"{self.then()}") from None

    def checkpoint(self, ckpt: dict, step: int) -> None:
        self.write(ckpt, self.ckpt_path, f"the step-{step} checkpoint")
        self.last_saved = step
