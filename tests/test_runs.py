"""The test harness's own promise (runs.py): a child process that hangs fails its test in bounded
time and says where it hung."""

import sys

import pytest

from .runs import run_child


def test_a_hanging_child_fails_with_every_threads_stack():
    code = "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()\ntime.sleep(60)"
    with pytest.raises(AssertionError, match=r"(?s)still running after 2 s: .*Thread 0x.*File \"<string>\", line 3"):
        run_child([sys.executable, "-c", code], timeout=2)


def test_a_child_that_ends_gives_its_exit_status_and_output():
    proc = run_child([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], timeout=60)
    assert (proc.returncode, proc.stdout) == (3, "out\n")
