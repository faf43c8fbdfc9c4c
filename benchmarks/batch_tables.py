"""The CPU-side work of one batch of the sparse engine, part by part.

``python -m benchmarks.batch_tables --model resnet50 --batch-sizes 16 64 --input-size 224``

Before the features reach the first convolution, a batch needs its bookkeeping, all of it on
the CPU: the visible patches read from the mask, MinkowskiEngine's coordinate maps (hashing
every visible site at stride 1, 2, 4, ... up to the mask patch, 32 or 16) and our index tables (tiles, kernel maps,
canvas and image indices: the ones the model's layers read, found by running it once). On a
GPU this is time the CPU is not queueing kernels. Timed here, on fresh batches each repeat:

* ``me_insert sN``: MinkowskiEngine's ``insert_and_map`` of the sites at stride N (1, 2, ... up to
  the model's mask patch), which the engine did for every stride until it stopped hashing maps
  nobody reads (issue 19);
* ``tables <kind>``: building each kind of the tables the layers read on ``--device`` (a GPU's
  small blocks read window GEMMs' tables, the CPU's offset GEMMs') for the whole batch on the
  CPU, as a CPU run does (``table MB``: their size);
* with ``--device cuda``, ``cuda: tables <kind>``: the CPU's time to hand the GPU the
  tables a layer reads, each at its first read (tiles, the largest, are made there from small
  CPU parts, the rest are copied, pinned and non-blocking): what the CPU spends, the GPU working
  meanwhile; ``cuda, until done``: the same with the GPU's work waited for; and ``cuda,
  planned``: every table at once, in one copy, as pretraining makes a batch's while the GPU
  runs the batch before (``PatchSites.build_like``);
* ``sparsify insert=True|False``: the engine's entry with and without inserting the maps.

Prints a markdown table of medians (ms) per batch size, and the before/after totals.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import timm
import torch

from spark_sparse import SparseEncoder, random_active
from spark_sparse.encoders.families import encoder_strides, input_sizes
from spark_sparse.encoders.refusals import ConversionError
from spark_sparse.run.runtime import configure_cpu
from spark_sparse.sparse.patch_sites import STRING_ID, BatchCoordinates, PatchSites
from spark_sparse.sparse.sparsify import sparsify

from . import arguments


def strides_to(patch: int) -> list[int]:
    """The strides MinkowskiEngine hashed sites at: 1, 2, 4, ... up to the mask's patch."""
    return [2**i for i in range(patch.bit_length())]


def tables_read(model: str, input_size: int, device: torch.device = torch.device("cpu")) -> list[tuple]:
    """The keys of the tables ``model``'s layers read in a train-mode forward and backward with
    features on ``device`` (a GPU's layers read some other tables than the CPU's)."""
    encoder = SparseEncoder.from_timm(timm.create_model(model, num_classes=0)).train().to(device)
    g = torch.Generator().manual_seed(0)
    grid = (input_size // encoder.stride, input_size // encoder.stride)
    images = torch.randn(2, 3, input_size, input_size, generator=g).to(device)
    feats = encoder(images, random_active(2, grid, 0.6, g))
    sum(f.F.sum() for f in feats).backward()
    return PatchSites.of(feats[0]).tables()


def batch_sites(active: torch.Tensor, patch: int, device: torch.device | str = "cpu") -> PatchSites:
    b, _, gh, gw = active.shape
    visible = active.reshape(-1).nonzero()[:, 0]
    patches = torch.stack([visible // (gh * gw), visible // gw % gh, visible % gw], 1)
    return PatchSites(BatchCoordinates(), patches, patch, (gh, gw), b, device)


def nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    return 0


def measure(keys: list[tuple], batch: int, input_size: int, mask_ratio: float, repeats: int,
            seed: int, device: torch.device, patch: int = 32) -> tuple[dict[str, float], float]:
    """Median ms of every part, and the tables' size in MB, over ``repeats`` fresh batches masked
    in ``patch``-pixel patches (the model's coarsest stride)."""
    g = torch.Generator().manual_seed(seed)
    grid = (input_size // patch, input_size // patch)
    images = torch.randn(batch, 3, input_size, input_size, generator=g)
    times: dict[str, list[float]] = defaultdict(list)
    size_mb = 0.0
    for r in range(repeats + 1):  # the first round warms up
        active = random_active(batch, grid, mask_ratio, g)
        sites = batch_sites(active, patch)
        manager = BatchCoordinates()
        parts: dict[str, float] = defaultdict(float)
        for stride in strides_to(patch):
            coords = sites.coordinates(stride)
            start = time.perf_counter()
            manager.insert_and_map(coords, [stride, stride], STRING_ID)
            parts[f"me_insert s{stride}"] = time.perf_counter() - start
        for key in keys:
            start = time.perf_counter()
            sites._cached(*key)  # noqa: SLF001 - the engine's own builder of that table
            parts[f"tables {key[0]}"] += time.perf_counter() - start
        if device.type == "cuda":
            for wait in (False, True):
                for_gpu = batch_sites(active, patch, device)
                torch.cuda.synchronize(device)
                for key in keys:
                    start = time.perf_counter()
                    for_gpu._table(*key)  # noqa: SLF001 - what a layer's first read of it costs
                    if wait:
                        torch.cuda.synchronize(device)
                    parts[f"cuda{', until done' if wait else ''}: tables {key[0]}"] += time.perf_counter() - start
            planned = batch_sites(active, patch, device)
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            planned.build_like(for_gpu)
            parts["cuda, planned: every table"] = time.perf_counter() - start
        for insert in (True, False):
            start = time.perf_counter()
            sparsify(images, active, insert=insert)
            parts[f"sparsify insert={insert}"] = time.perf_counter() - start
        size_mb = sum(nbytes(v) for v in sites._cache.values()) / 2**20  # noqa: SLF001
        if r:
            for part, t in parts.items():
                times[part].append(t)
    return {part: statistics.median(t) * 1e3 for part, t in times.items()}, size_mb


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-sizes", type=arguments.whole(1), nargs="+", default=[16, 64])
    parser.add_argument("--input-size", type=arguments.multiple_of_32, default=224)
    parser.add_argument("--mask-ratio", type=arguments.mask_ratio, default=0.6)
    parser.add_argument("--repeats", type=arguments.repeats, default=5)
    parser.add_argument("--threads", type=arguments.whole(1), default=1,
                        help="torch threads (the work is single-threaded)")
    parser.add_argument("--seed", type=arguments.seed, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: the tables a GPU's layers read, and handing them to it")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but PyTorch sees no CUDA GPU")
    configure_cpu(args.threads)
    device = torch.device(args.device)
    if not timm.is_model(args.model):
        parser.error(f"--model: unknown timm model {args.model}")
    try:
        why = input_sizes(args.model).refusal(args.model, args.input_size)
        patch = encoder_strides(args.model)[-1]
    except ConversionError as err:
        parser.error(f"--model {args.model}: {err}")
    if why:
        parser.error(f"--model {args.model}: {why}")
    keys = tables_read(args.model, args.input_size, device)
    results = {b: measure(keys, b, args.input_size, args.mask_ratio, args.repeats, args.seed, device, patch)
               for b in args.batch_sizes}
    parts = list(next(iter(results.values()))[0])
    print(f"{args.model}, {args.input_size} px, mask {args.mask_ratio}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} batches (ms)\n")
    print("| part | " + " | ".join(f"batch {b}" for b in results) + " |")
    print("|---|" + "---:|" * len(results))
    for part in parts:
        print(f"| {part} | " + " | ".join(f"{ms[part]:.2f}" for ms, _ in results.values()) + " |")
    me = {b: sum(v for k, v in ms.items() if k.startswith("me_insert")) for b, (ms, _) in results.items()}
    tables = {b: sum(v for k, v in ms.items() if k.startswith("tables")) for b, (ms, _) in results.items()}
    gpu = {b: sum(v for k, v in ms.items() if k.startswith("cuda:")) for b, (ms, _) in results.items()}
    planned = {b: ms.get("cuda, planned: every table", 0.0) for b, (ms, _) in results.items()}
    print("| **MinkowskiEngine, every stride** | " + " | ".join(f"**{me[b]:.2f}**" for b in results) + " |")
    print("| **our tables, on the CPU** | " + " | ".join(f"**{tables[b]:.2f}**" for b in results) + " |")
    if device.type == "cuda":
        print("| **our tables, for the GPU (CPU time)** | " + " | ".join(f"**{gpu[b]:.2f}**" for b in results) + " |")
    print("| table MB a batch | " + " | ".join(f"{mb:.1f}" for _, mb in results.values()) + " |")
    for b in results:
        print(f"\nbatch {b}: CPU bookkeeping of a batch: before issue 19 (ME at every stride + tables) "
              f"{me[b] + tables[b]:.1f} ms; now (tables) {tables[b]:.1f} ms on the CPU"
              + (f", {gpu[b]:.1f} ms of CPU time for the GPU ({planned[b]:.1f} ms planned, in one copy)"
                 if device.type == "cuda" else ""))


if __name__ == "__main__":
    main()
