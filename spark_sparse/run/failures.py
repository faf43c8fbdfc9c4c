"""What ends a running run for a reason outside its config (divergence, a full disk, out of
memory), each said in one line naming what was kept."""

from __future__ import annotations

import errno

import torch
from omegaconf import DictConfig


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class RunFailed(RuntimeError):
    """The run stopped for a reason outside its config (disk full, out of memory); the message
    says what was kept."""


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


# what every app's out-of-memory line suggests (an app may name more: App.memory_savers)
LESS_MEMORY = "a smaller input_size or batch_size"


def out_of_memory(err: BaseException, cfg: DictConfig, kept: str, processes: int = 1,
                  savers: str = LESS_MEMORY) -> RunFailed:
    """The one-line account of an allocation failure: the size asked for, what needs less, what was kept."""
    return RunFailed(f"out of memory at input_size={cfg.input_size}, batch_size={cfg.batch_size} "
                     f"({cfg.model}, {processes} process(es)): {first_line(err)}; {savers} needs less; {kept}")
