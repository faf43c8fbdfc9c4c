"""What the analysis tools' command lines (``python -m spark_sparse.report`` / ``visualize``)
share with the training apps': a bad command ends in one line on stderr and a non-zero exit code,
never a traceback."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

from ..data.images import DataError
from ..run.checkpoint import CheckpointError
from ..run.checks import Refused
from ..run.failures import first_line
from ..run.signals import Stopped


class CommandError(ValueError):
    """A command that cannot be carried out; its message is the line the user sees."""


# what a user's command can run into: its own mistakes, missing or damaged files, unusable data,
# a full or read-only disk, a sparse engine without MinkowskiEngine (each message names the cause)
USER_ERRORS = (CommandError, CheckpointError, DataError, Refused, OSError, ImportError)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``prog: error: ... (see --help)``), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_command(command: Callable[[], None]) -> None:
    """Run ``command``; what a user can cause (``USER_ERRORS``) ends in one line, exit code 1, and
    Ctrl-C in one line with the shell's code for it (a fine-tuning it runs saves first: the same
    command continues it)."""
    try:
        command()
    except USER_ERRORS as err:
        print(f"error: {first_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None
    except Stopped as stop:
        print(f"stopped by {stop.signame}; the same command continues where it stopped", file=sys.stderr)
        raise SystemExit(stop.exit_code) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
