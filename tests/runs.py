"""What the tests of whole runs share: the apps' command lines, their one-line errors, stopping a
run right after a checkpoint, and bounded waits that cannot hang."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import runpy
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from spark_sparse.run import checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
# a pretraining that takes a fraction of a second a step on 2 cores
PRETRAIN = ["model=resnet18", "input_size=64", "batch_size=4", "decoder.width=64", "vis_images=1",
            "threads=1", "log_every=1"]


def run_child(cmd: list[str], timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``cmd`` from the repository root, its output captured, bounded in time. A child still running
    at ``timeout`` is sent SIGABRT, on which Python's fault handler prints every thread's stack, and
    the test fails with them: a hang says where it hung."""
    env = dict(ENV if env is None else env, PYTHONFAULTHANDLER="1")
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            raise AssertionError(f"still running after {timeout} s: {cmd[:3]}...; its threads then:\n"
                                 f"{err[-8000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_cli(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m module args`` from the repository root, single-threaded, bounded in time."""
    return run_child([sys.executable, "-m", module, *args], timeout)


def pretrain_cli(*overrides: str, **kwargs) -> subprocess.CompletedProcess:
    return run_cli("spark_sparse.pretrain", *PRETRAIN, *overrides, **kwargs)


def cli_in_process(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module args`` run in this process: the same entry point, output and exit code as
    ``run_cli``'s, without the ~6 s a fresh interpreter spends importing torch, timm and hydra.
    For what the command says and leaves behind; what only a process of its own shows (signals,
    SIGKILL, a real allocation failure, a warning printed to stderr while it loads) keeps
    ``run_cli``: each training app and analysis command has such a run, its stderr checked to hold
    nothing else.
    What the run changes in this process is put back: arguments, environment, logging."""
    argv, environ = sys.argv, dict(os.environ)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = [module, *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:  # as the interpreter takes it: None is 0, a message is printed and 1
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            err.write(f"{stop.code}\n")
            code = 1
    finally:
        sys.argv = argv
        os.environ.clear()
        os.environ.update(environ)
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:], root.level = handlers, level
    return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


def pretrain_in_process(*overrides: str) -> subprocess.CompletedProcess:
    return cli_in_process("spark_sparse.pretrain", *PRETRAIN, *overrides)


PROGRESS_BAR = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")  # tqdm's "desc:  33%|###   | 1/3 [..."


def error_lines(stderr: str) -> list[str]:
    """stderr without the progress bar (tqdm redraws it with carriage returns) and blank lines."""
    return [line for line in stderr.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]


def assert_one_line_error(proc: subprocess.CompletedProcess, message: str, code: int = 1) -> None:
    """The command failed with ``code`` and said why in exactly one line, with no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and message in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir)}


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of ``run_dir``'s last.pt, None while there is none (it appears atomically)."""
    path = run_dir / "checkpoints" / "last.pt"
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)["step"]


def wait_until(done: Callable[[], bool], proc: subprocess.Popen, timeout: float = 300,
               poll: float = 0.05) -> None:
    """Wait for ``done()`` while ``proc`` runs; fail (never hang) if it exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the process ended (code {proc.returncode}) before the awaited state: "
                                 f"{err[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"not reached within {timeout} s")
        time.sleep(poll)


def stop_run() -> None:
    raise KeyboardInterrupt  # as if the process were killed here (the in-process stand-in)


def after_checkpoint(monkeypatch, step: int, action: Callable[[], None] = stop_run) -> None:
    """Run ``action`` right after the run has written its step-``step`` checkpoint (by default the
    run stops there, as if it were killed; the test then resumes it)."""
    real_save = checkpoint.atomic_save

    def save_then_act(obj, path):
        real_save(obj, path)
        if isinstance(obj, dict) and obj.get("step") == step and Path(path).name == "last.pt":
            monkeypatch.setattr(checkpoint, "atomic_save", real_save)
            action()

    monkeypatch.setattr(checkpoint, "atomic_save", save_then_act)
