"""The CPU allocator policy of entry points and of the test workers (spark_sparse.run.runtime),
measured in a child process: the resident set is the process's own."""

import sys

from .runs import run_child

CHILD = """
import torch
from spark_sparse.run import runtime

def resident_mib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024

assert runtime.keep_freed_memory()
base = resident_mib()
blocks = [torch.ones(2 ** 25) for _ in range(8)]  # 1 GiB in 128 MiB blocks
del blocks
kept = resident_mib() - base
assert runtime.trim_freed_memory()
print(kept, resident_mib() - base)
"""


def test_kept_memory_stays_resident_until_it_is_trimmed():
    done = run_child([sys.executable, "-c", CHILD], timeout=120)
    assert done.returncode == 0, done.stderr
    kept, trimmed = map(int, done.stdout.split())
    assert kept > 900, "freed blocks were returned although the policy keeps them"
    assert trimmed < 100, f"{trimmed} MiB still resident after the trim"
