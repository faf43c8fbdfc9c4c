"""Data-parallel SparK with the sparse engine on ONE GPU, under torchrun (issue 19's checks).

    torchrun --standalone --nproc_per_node=1 scripts/distributed_check.py nccl
    torchrun --standalone --nproc_per_node=2 scripts/distributed_check.py gloo

The app (spark_sparse.pretrain) starts no process group for one process, and gives rank r the
GPU cuda:r, which a one-GPU machine lacks for r = 1. This script makes what can be checked
there: a process group of the named backend (NCCL with one process; gloo with two processes
sharing cuda:0, which NCCL refuses), the app's synchronised batch norms
(run.distributed.convert_sync_batchnorm) and DistributedDataParallel around SparK with the
sparse encoder, a few optimizer steps on each rank's slice of one global batch. On CUDA the same
steps again as pretraining's ``cuda_graph=true`` takes them under torchrun: unsynchronised norms,
no DDP, each step replayed from a CUDA graph of the first (spark_sparse/model/graphed.py), then
the gradients averaged over the ranks (run.distributed.average_gradients). It prints a line per
way: the steps' mean losses and the largest difference of any parameter between ranks (0 when
they are kept in step), and exits 1 if the losses are not finite or the ranks differ.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from spark_sparse.model.graphed import GraphedStep
from spark_sparse.model.spark import SparK
from spark_sparse.run import distributed


def batches(rank: int, world: int, steps: int, batch: int, size: int, device: torch.device):
    """Each step's slice of one global batch for this rank, the same on every call."""
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        images = torch.randn(batch, 3, size, size, generator=g)
        yield images[rank * batch // world:(rank + 1) * batch // world].to(device)


def eager_steps(model: SparK, device: torch.device, rank: int, world: int, steps: int, batch: int,
                size: int) -> list[float]:
    distributed.convert_sync_batchnorm(model)
    net = DistributedDataParallel(model, device_ids=[0] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    for images in batches(rank, world, steps, batch, size, device):
        loss = net(images, model.random_mask(images, rank, world))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(distributed.mean_over_ranks(loss))
    return losses


def replayed_steps(model: SparK, device: torch.device, rank: int, world: int, steps: int, batch: int,
                   size: int) -> list[float]:
    distributed.broadcast_parameters(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    graphed, losses = None, []
    for images in batches(rank, world, steps, batch, size, device):
        active = model.random_mask(images, rank, world)
        if graphed is None:
            graphed = GraphedStep(model, lambda x, plan: model(x, plan)["loss"], images, model.plan(active, device))
        loss = graphed(images, model.plan(active, device, like=graphed.plan))
        distributed.average_gradients(model.parameters())
        optimizer.step()
        losses.append(distributed.mean_over_ranks(loss))
    return losses


def spread(model: SparK) -> float:
    """The largest difference of any parameter between ranks."""
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return float((high - low).abs().max())


def main(backend: str, steps: int = 3, batch: int = 8, size: int = 128) -> int:
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = torch.cuda.is_available()  # without a GPU (a dry run): the CPU, gloo only
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")  # every rank on the one GPU
    if cuda:
        torch.cuda.set_device(device)
    where = torch.cuda.get_device_name(device) if cuda else "the CPU"
    ways = {"": eager_steps}
    if cuda:
        ways[", steps replayed from CUDA graphs"] = replayed_steps
    failed = False
    for how, take_steps in ways.items():
        torch.manual_seed(rank)  # each rank its own starting weights: either way must hand out rank 0's
        model = SparK.build("resnet18", decoder_width=128).to(device)
        losses = take_steps(model, device, rank, world, steps, batch, size)
        diff = spread(model)
        ok = all(torch.isfinite(torch.tensor(losses))) and diff == 0.0
        failed |= not ok
        if rank == 0:
            print(f"{backend}, {world} process(es) on {where}{how}: losses "
                  f"{[round(x, 4) for x in losses]}, largest parameter difference between ranks {diff:.3g}: "
                  f"{'ok' if ok else 'FAILED'}", flush=True)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("nccl", "gloo") or "RANK" not in os.environ:
        raise SystemExit(__doc__.split("\n\n")[1])
    sys.exit(main(sys.argv[1]))
