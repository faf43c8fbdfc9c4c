"""Checkpoints that survive a crash: written to a temporary file, then atomically renamed."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


# what a spark_sparse training checkpoint holds at least
CHECKPOINT_KEYS = frozenset({"model", "optimizer", "scheduler", "step", "config"})


class CheckpointError(ValueError):
    """A file that cannot be read as a training checkpoint (empty, truncated, or something else)."""


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to ``path`` so that a reader (or a crash) never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
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


def rng_state(mask_generator: torch.Generator | None = None) -> dict[str, Any]:
    """The global RNGs' states (and the mask generator's, for pretraining)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if mask_generator is not None:
        state["mask"] = mask_generator.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], mask_generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if mask_generator is not None:
        mask_generator.set_state(state["mask"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
