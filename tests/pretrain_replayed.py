"""A torchrun entry point for tests: ``spark_sparse.pretrain`` on the CPU with the GPU's path for
small blocks (window GEMMs, whose tables keep their shape from batch to batch) and, with
``cuda_graph=true``, CUDA graphs stood in for by ``tests/replay.py``'s eager replays: the
processes' side of replayed steps (rank 0's weights, gradients averaged after each step) runs
without a GPU."""

import spark_sparse.pretrain.app as pretrain
import spark_sparse.pretrain.checks as checks
from spark_sparse.sparse import gemm_conv
from tests.replay import EagerReplay

gemm_conv.SMALL_BLOCK_PATHS["cpu"] = "windows"
pretrain.GraphedStep = EagerReplay
real_check = checks.check_graphable


def check_graphable(cfg, world_size: int) -> None:
    """Every refusal but that of a device other than CUDA."""
    on_cuda = cfg.copy()
    on_cuda.device = "cuda"
    real_check(on_cuda, world_size)


checks.check_graphable = check_graphable

if __name__ == "__main__":
    pretrain.main()
