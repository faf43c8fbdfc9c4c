"""Which of patch_conv's two exact paths is faster, per convolution of a real encoder.

``python -m benchmarks.conv_paths --model resnet50 --batch-size 8 --mask-ratio 0.6``

Every k x k convolution of the sparse encoder is timed (forward + backward, on the input it sees
in a forward pass of random images) as tile convolution and as offset GEMMs, interleaved, the
best of ``--repeats`` runs each; the table shows which path ``PatchConvolution`` picks and which
one was faster. This is the measurement behind ``PatchConvolution.tile_min_sites``.
"""

from __future__ import annotations

import argparse
import time

import torch

from spark_sparse.sparse import ME  # the engine's import (its CPU_ONLY note silenced)
from spark_sparse import SparseEncoder, random_active
from spark_sparse.sparse.patch_conv import PatchConvolution
from spark_sparse.sparse.patch_sites import PatchSites
from spark_sparse.run.runtime import configure_cpu

PATHS = {"tiles": 1, "offset GEMMs": 10**9}  # tile_min_sites that forces each path


def conv_inputs(encoder: SparseEncoder, images: torch.Tensor, active: torch.Tensor) -> list:
    """(name, conv, input SparseTensor) of every k x k convolution, in forward order."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, inp, name=name: seen.append((name, m, inp[0])))
             for name, m in encoder.named_modules()
             if isinstance(m, PatchConvolution) and int(m.kernel_generator.kernel_size[0]) > 1]
    with torch.no_grad():
        encoder(images, active)
    for h in hooks:
        h.remove()
    return seen


def time_path(conv: PatchConvolution, x: ME.SparseTensor, min_sites: int, grad_input: bool) -> float:
    conv.tile_min_sites = min_sites
    feats = x.F.detach().requires_grad_(grad_input)
    inp = ME.SparseTensor(feats, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)
    conv.zero_grad(set_to_none=True)
    start = time.perf_counter()
    conv(inp).F.sum().backward()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    configure_cpu()
    g = torch.Generator().manual_seed(args.seed)
    size = args.input_size
    images = torch.randn(args.batch_size, 3, size, size, generator=g)
    active = random_active(args.batch_size, (size // 32, size // 32), args.mask_ratio, g)
    encoder = SparseEncoder.from_timm(args.model).train()

    print(f"{args.model}, batch {args.batch_size}, {size} px, mask {args.mask_ratio}, forward+backward, "
          f"best of {args.repeats} (ms)\n")
    print("| layer | channels | kernel/stride | sites per side in->out | tiles | offset GEMMs | picked | faster |")
    print("|---|---|---|---|---:|---:|---|---|")
    totals = dict.fromkeys(PATHS, 0.0)
    picked_total = 0.0
    for name, conv, x in conv_inputs(encoder, images, active):
        k, stride = int(conv.kernel_generator.kernel_size[0]), int(conv.kernel_generator.kernel_stride[0])
        s = PatchSites.of(x).sites_per_side(x.tensor_stride[0])
        picked = "tiles" if conv.uses_tiles(s) else "offset GEMMs"
        times: dict[str, list[float]] = {p: [] for p in PATHS}
        for r in range(args.repeats + 1):  # the first round warms up
            for path in (PATHS if r % 2 else reversed(PATHS)):
                t = time_path(conv, x, PATHS[path], grad_input=name != "body.conv1")
                if r:
                    times[path].append(t)
        del conv.tile_min_sites  # back to the class default
        best = {p: min(v) * 1e3 for p, v in times.items()}
        for p in PATHS:
            totals[p] += best[p]
        picked_total += best[picked]
        faster = min(best, key=best.get)
        print(f"| {name.removeprefix('body.')} | {conv.in_channels}->{conv.out_channels} | {k}/{stride} | "
              f"{s}->{s // stride} | {best['tiles']:.1f} | {best['offset GEMMs']:.1f} | {picked} | {faster} |")
    print(f"\ntotal: tiles {totals['tiles']:.0f} ms, offset GEMMs {totals['offset GEMMs']:.0f} ms, "
          f"as picked (tile_min_sites={PatchConvolution.tile_min_sites}) {picked_total:.0f} ms")


if __name__ == "__main__":
    main()
