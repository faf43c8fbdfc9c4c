"""The CPU allocator policy of entry points and of the test workers (spark_sparse.run.runtime),
measured in a child process: the resident set is the process's own; and the threads a run is
given stay its threads."""

import os
import sys

import pytest
import timm
import torch

from .conftest import needs_minkowski
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


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="MinkowskiEngine's default is every core: one here")
@needs_minkowski
def test_a_sparse_batch_leaves_torchs_threads_as_they_were():
    from spark_sparse import SparseEncoder, random_active

    # MinkowskiEngine's coordinate managers set OpenMP's threads (by default to every core): a run's
    # `threads`, or a test worker's share of the cores, would be lost at its first batch
    torch.set_num_threads(1)  # the autouse fixture restores the worker's own afterwards
    encoder = SparseEncoder.from_timm(timm.create_model("resnet18", num_classes=0)).train()
    g = torch.Generator().manual_seed(0)
    features = encoder(torch.randn(2, 3, 64, 64, generator=g), random_active(2, (2, 2), 0.6, g))
    sum(f.F.sum() for f in features).backward()
    assert torch.get_num_threads() == 1
