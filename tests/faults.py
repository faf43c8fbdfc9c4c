"""Faults the tests inject into a run.

A full disk is simulated where torch.save meets it: the checkpoint writer's file (opened with
``os.fdopen``) takes ``saves`` whole files, then every write fails with ENOSPC after a few bytes, so
the real torch.save reports it as it does on a full file system (a RuntimeError from its archive
writer, with the OSError as its context).
"""

from __future__ import annotations

import errno
import os

ROOM = 4096  # bytes a file still gets on the full disk: a partial write, as a real disk gives


class FillingFile:
    """A binary file that takes ``room`` more bytes, then fails every write with ENOSPC."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            self.file.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name: str):
        return getattr(self.file, name)

    def __enter__(self) -> FillingFile:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def fill_disk_after(saves: int, set_attr=setattr) -> None:
    """The next ``saves`` binary files opened for writing with os.fdopen are written whole; the disk
    is full for every one after them. ``set_attr``: pytest's monkeypatch.setattr in a test."""
    real_fdopen = os.fdopen
    opened = [0]

    def fdopen(fd, mode="r", *args, **kwargs):
        file = real_fdopen(fd, mode, *args, **kwargs)
        if "w" not in mode or "b" not in mode:
            return file
        opened[0] += 1
        return file if opened[0] <= saves else FillingFile(file, ROOM)

    set_attr(os, "fdopen", fdopen)
