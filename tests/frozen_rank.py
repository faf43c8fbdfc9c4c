"""A rank that freezes in a collective, for tests/test_distributed.py. A module of its own, so the
processes ``mp.spawn`` starts import torch and the run layer's distributed helpers only (the test
module would bring timm, hydra and both apps: seconds a process)."""

import os
import time

import torch

from spark_sparse.run import distributed

TIMEOUT_S = 2


def frozen_rank_worker(rank: int, port: int, outcome, released) -> None:
    """Rank 1 never joins the collective until ``released``; rank 0 reports how its wait ended."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    distributed.init_from_env(timeout_s=TIMEOUT_S)
    if rank == 1:
        released.wait(timeout=300)  # frozen: never joins the collective, until rank 0 has given up
        return
    start = time.monotonic()
    try:
        distributed.mean_over_ranks(torch.ones(()))
        outcome.put(("answered", time.monotonic() - start))
    except RuntimeError as err:
        outcome.put(("timed out" if distributed.is_timeout(err) else repr(err), time.monotonic() - start))
    finally:
        released.set()
