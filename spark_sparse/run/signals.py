"""Clean stops on SIGINT/SIGTERM: the first one lets the run save after the current step, a second
one stops at once."""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType


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


class StopSignals:
    """While active, a first SIGINT or SIGTERM only sets ``requested``: the training loop saves
    a checkpoint after the current step and stops. A second one raises ``Stopped`` at once.

    A signal the process was started ignoring stays ignored: a job sent to the background by a
    non-interactive shell (``nohup python -m ... &`` in a script) ignores SIGINT, so that the
    terminal's Ctrl-C is not for it, as Python's own KeyboardInterrupt handler leaves it.

    Outside the main thread (where Python cannot install handlers) it does nothing. Processes
    forked meanwhile (data-loader workers; Ctrl-C reaches the terminal's whole process group)
    inherit the handler but leave the signal to the process that installed it, which stops the
    run and its workers: they neither speak nor stop.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS
                              if signal.getsignal(s) is not signal.SIG_IGN}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked worker: the main process decides
            return
        name = signal.Signals(signum).name
        if self.requested is not None:
            raise Stopped(name)
        self.requested = name
        print(f"{name}: saving a checkpoint after this step, then stopping "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)
